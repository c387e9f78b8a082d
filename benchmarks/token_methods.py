"""Throughput of each token method beside the dense backbone, against its FLOPs bound.

Random-weight timm backbone (speed does not depend on the weights), eval mode, fp32, ``torch.no_grad``.
All models are timed in the same process, interleaved round by round (dense, then each method), so a
noisy machine shifts them alike; each round's throughput ratio to that round's dense figure is kept
and the median over rounds is reported with its spread (min-max).

    python benchmarks/token_methods.py --backbone deit_small_patch16_224 --batch 32 --rounds 7

Prints a table and writes ``--out`` (JSON) with the machine it ran on.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time

import torch

import methods  # noqa: F401  (the CPU torchvision guard, before timm)
from methods import BackboneConfig, count_gflops, create_backbone, get_method
from methods.measure import time_forward

#: Each method at its paper setting on a 12-block DeiT (methods.md).
PAPER = {
    "dynamicvit": {"keep_ratio": 0.7, "pruning_loc": (3, 6, 9)},
    "evovit": {"prune_ratio": 0.5, "prune_location": 4},
    "spvit": {},  # keep_ratios 0.617/0.369/0.137 before blocks 3, 6, 9
    "tome": {"r": 13},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="deit_small_patch16_224")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--methods", nargs="*", default=list(PAPER))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="JSON results file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = create_backbone(BackboneConfig(name=args.backbone))
    image = (3, *base.patch_embed.img_size)
    dense_method = get_method("dense")
    models = {"dense": dense_method.build_model(dense_method.config_cls(), copy.deepcopy(base)).eval()}
    for name in args.methods:
        method = get_method(name)
        models[name] = method.build_model(method.config_cls(**PAPER[name]), copy.deepcopy(base)).eval()
    gflops = {name: count_gflops(m, image) for name, m in models.items()}
    x = torch.randn(args.batch, *image)
    ratios: dict[str, list[float]] = {n: [] for n in models if n != "dense"}
    ips: dict[str, list[float]] = {n: [] for n in models}
    start = time.perf_counter()
    for r in range(args.rounds):
        dense_ips = None
        for name, model in models.items():
            t = time_forward(model, x, args.warmup, args.iters)
            ips[name].append(args.batch / t)
            if name == "dense":
                dense_ips = args.batch / t
            else:
                ratios[name].append(args.batch / t / dense_ips)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {v[-1]:.1f} img/s" for n, v in ips.items()), flush=True)
    rows = []
    for name, rs in ratios.items():
        bound = gflops["dense"] / gflops[name]
        speedup = statistics.median(rs)
        rows.append({
            "method": name, "setting": PAPER[name], "gflops": gflops[name], "dense_gflops": gflops["dense"],
            "throughput_ips": statistics.median(ips[name]), "dense_throughput_ips": statistics.median(ips["dense"]),
            "speedup": speedup, "speedup_min": min(rs), "speedup_max": max(rs), "flops_bound": bound, "efficiency": speedup / bound,
        })
    print(f"\n{args.backbone}, batch {args.batch}, fp32, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds "
          f"({time.perf_counter() - start:.0f} s):")
    print(f"  {'method':<11} {'GFLOPs':>7} {'bound':>6} {'speed-up (min-max)':>20} {'efficiency':>10}")
    print(f"  {'dense':<11} {gflops['dense']:>7.3f} {'1.00':>6} {'1.00':>20} {'':>10}   {statistics.median(ips['dense']):.1f} img/s")
    for row in rows:
        spread = f"{row['speedup']:.2f} ({row['speedup_min']:.2f}-{row['speedup_max']:.2f})"
        print(f"  {row['method']:<11} {row['gflops']:>7.3f} {row['flops_bound']:>6.2f} {spread:>20} {row['efficiency']:>10.2f}")
    if args.out:
        machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                   "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                   "date": time.strftime("%Y-%m-%d")}
        with open(args.out, "w") as f:
            json.dump({"backbone": args.backbone, "batch": args.batch, "rounds": args.rounds, "machine": machine, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
