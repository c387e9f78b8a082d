"""prunetune's ToMe beside the authors' own code (facebookresearch/ToMe), on the same weights.

The authors' ``tome.patch.timm`` is applied to one copy of a random-weight timm DeiT, prunetune's
``tome`` method wraps another copy of the same weights, and the dense backbone is a third. First the
logits of the two ToMe models are compared (they should agree to float rounding); then the three are
timed interleaved in this process (``methods.measure.time_rounds``: call by call, the order rotating
each cycle), per batch and mode (eager, or all three ``torch.compile``-d alike). Reported per row:
each ToMe model's speed-up over dense and prunetune's over the authors' (cycle-by-cycle ratios: the
median over all rounds, and the min-max of the rounds' medians).

The authors' code is not shipped with prunetune; point ``--tome-src`` at a checkout of it
(``git clone https://github.com/facebookresearch/ToMe``; the directory holding the ``tome`` package):

    python benchmarks/tome_authors.py --tome-src ~/src/ToMe --batches 1,32 --modes eager,compiled --rounds 7 \\
        --out benchmarks/results/tome_authors_cpu.json
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import methods  # noqa: F401  (the CPU torchvision guard, before timm)
from methods import BackboneConfig, count_gflops, create_backbone, get_method
from methods.measure import MeasureConfig, spread, time_rounds
from orchestrator.bench import bench_defaults, device_and_precision, machine_record


def authors_patch(src: str):
    """The authors' ``tome.patch.timm`` from the checkout at ``src``; one line and exit 2 if absent."""
    if not (Path(src) / "tome" / "patch" / "timm.py").is_file():
        sys.exit(f"error: --tome-src {src!r} holds no tome/patch/timm.py (a checkout of facebookresearch/ToMe)")
    sys.path.insert(0, str(Path(src).resolve()))
    return importlib.import_module("tome.patch.timm").apply_patch


def build(backbone: str, r: int, patch) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    base = create_backbone(BackboneConfig(name=backbone)).eval()
    authors = copy.deepcopy(base)
    patch(authors)  # the authors' default: proportional attention on, as prunetune's
    authors.r = r
    tome = get_method("tome")
    ours = tome.build_model(tome.config_cls(r=r), copy.deepcopy(base)).eval()
    return {"dense": base, "authors": authors, "prunetune": ours}


@torch.no_grad()
def bench_row(models: dict[str, torch.nn.Module], image: tuple[int, ...], batch: int, compiled: bool, rounds: int,
              device: str = "cpu", precision: str = "fp32") -> dict:
    warmup, iters = bench_defaults(batch)
    prepared = {n: torch.compile(m, dynamic=False) if compiled else m for n, m in models.items()}
    x = torch.randn(batch, *image, device=device)
    timed = time_rounds(prepared, x, MeasureConfig(warmup=warmup, iters=iters, rounds=rounds, precision=precision))

    def ratio(faster: str, slower: str) -> dict[str, float]:  # slower's seconds over faster's
        pooled, per_round = timed.ratio(faster, slower)
        return {"median": pooled, "min": min(per_round), "max": max(per_round)}

    return {
        "batch": batch, "mode": "compiled" if compiled else "eager", "precision": precision, "rounds": rounds, "warmup": warmup, "iters": iters,
        "latency_ms": {n: statistics.median(timed.seconds(n)) * 1e3 for n in prepared},
        "latency_spread": {n: spread(timed.seconds(n)) for n in prepared},
        "authors_speedup": ratio("authors", "dense"),
        "prunetune_speedup": ratio("prunetune", "dense"),
        "prunetune_over_authors": ratio("prunetune", "authors"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tome-src", required=True, help="a checkout of facebookresearch/ToMe (holds tome/)")
    p.add_argument("--backbone", default="deit_small_patch16_224")
    p.add_argument("--r", type=int, default=13)
    p.add_argument("--batches", default="1,32")
    p.add_argument("--modes", default="eager,compiled")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default=None, help="default cuda if available, else cpu")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"], help="default fp32 on CPU, bf16 on a GPU")
    p.add_argument("--out", default=None, help="JSON results file")
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if bad := [m for m in modes if m not in ("eager", "compiled")]:
        sys.exit(f"error: --modes {bad[0]!r}: expected eager or compiled")
    patch = authors_patch(args.tome_src)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, precision = device_and_precision(args.device, args.precision)
    models = build(args.backbone, args.r, patch)
    image = (3, *models["dense"].patch_embed.img_size)
    gflops = {n: count_gflops(m, image) for n, m in models.items() if n != "authors"}  # the authors' patch: same merges
    models = {n: m.to(device) for n, m in models.items()}
    x = torch.randn(4, *image, device=device)
    with torch.no_grad():
        diff = (models["authors"](x) - models["prunetune"](x).logits).abs().max().item()  # fp32 on both
    print(f"{args.backbone} on {device} ({precision}), r = {args.r}: max |logit difference| prunetune vs the authors' code = {diff:.2e}; "
          f"GFLOPs dense {gflops['dense']:.3f}, ToMe {gflops['prunetune']:.3f} (bound {gflops['dense'] / gflops['prunetune']:.2f}x)",
          flush=True)
    rows = []
    for batch in batches:
        for mode in modes:
            start = time.perf_counter()
            row = bench_row(models, image, batch, mode == "compiled", args.rounds, device, precision)
            rows.append(row)
            o, a, s = row["prunetune_over_authors"], row["authors_speedup"], row["prunetune_speedup"]
            print(f"batch {batch:>3} {mode:<8}: prunetune / authors {o['median']:.3f} ({o['min']:.2f}-{o['max']:.2f}); "
                  f"over dense: authors {a['median']:.2f}x, prunetune {s['median']:.2f}x; "
                  f"latency ms dense {row['latency_ms']['dense']:.1f}, authors {row['latency_ms']['authors']:.1f}, "
                  f"prunetune {row['latency_ms']['prunetune']:.1f} ({time.perf_counter() - start:.0f} s)", flush=True)
    if args.out:
        doc = {"backbone": args.backbone, "r": args.r, "device": device, "precision": precision, "max_logit_diff": diff, "gflops": gflops,
               "authors_code": "facebookresearch/ToMe tome.patch.timm", "machine": machine_record(device), "rows": rows}
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
