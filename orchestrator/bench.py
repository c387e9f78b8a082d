"""``prunetune bench``: one method's model timed beside its dense backbone, at one batch and precision.

Builds the method's model on the backbone (random weights, or a checkpoint's), exactly as a trial
does, and times it with ``methods.measure.bench_pair`` (the code behind a trial's latency figures):
both models in this process, interleaved call by call after warm-up, medians and spreads over
rounds, the speed-up as the median of cycle-by-cycle throughput ratios, fvcore GFLOPs of both.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import platform
import time
from dataclasses import replace
from typing import Any

import torch

from methods import CheckpointError, bench_pair, create_backbone, get_method
from methods.measure import profile_ops
from methods.dense import DenseViT

from .config import ExperimentConfig, _plain, apply_overrides, experiment_from_dict
from .errors import UserError

__all__ = ["bench_experiment", "run_bench", "machine_record", "format_bench", "bench_defaults"]


def machine_record(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Where a measurement ran: CPU model and cores, torch and its threads, the GPU if used, the date."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    record: dict[str, Any] = {
        "cpu": cpu, "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    dev = torch.device(device)
    if dev.type == "cuda":
        record["gpu"] = torch.cuda.get_device_name(dev)
        record["cuda"] = torch.version.cuda
    return record


def bench_defaults(batch: int) -> tuple[int, int]:
    """Warm-up and timed calls per round at ``batch``: about 10 and 30 images' worth, at least 1 and 3 calls."""
    return max(1, math.ceil(10 / batch)), max(3, math.ceil(30 / batch))


def default_device(device: str | None) -> str:
    """``device``, or unless told ``cuda`` where there is one, else ``cpu``."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def device_and_precision(device: str | None, precision: str | None) -> tuple[str, str]:
    """What the benchmark scripts time on unless told: ``default_device``; bf16 on a GPU, fp32 elsewhere."""
    device = default_device(device)
    return device, precision or ("bf16" if torch.device(device).type == "cuda" else "fp32")


def bench_experiment(method: str, backbone: str, sets: dict[str, Any] | None = None) -> ExperimentConfig:
    """The experiment config a bench run measures: ``method`` on ``backbone`` with ``sets`` (method fields
    as ``prunetune methods`` names them, or ``model.*``/``measure.*`` keys), validated (``ConfigError``)."""
    exp = experiment_from_dict({"method": method, "model": {"name": backbone}}, where="bench")
    return apply_overrides(exp, sets or {}) if sets else exp


def run_bench(
    exp: ExperimentConfig, batch: int = 1, precision: str = "fp32", compile: bool = False, device: str | None = None,
    checkpoint: str | None = None, layout: str = "auto", rounds: int | None = None, warmup: int | None = None,
    iters: int | None = None, seed: int = 0, profile: int = 0, compile_mode: str = "default",
) -> dict[str, Any]:
    """Time ``exp``'s method model beside its dense backbone; returns the setting, the machine and the figures.

    ``compile_mode`` is ``torch.compile``'s mode for both models (``reduce-overhead``: CUDA graphs).

    ``rounds``/``warmup``/``iters`` default to ``exp.measure.rounds`` and ``bench_defaults(batch)``.
    ``profile`` > 0 adds ``profile``: each model's top operators by self time (``profile_ops``).
    """
    if batch < 1:
        raise UserError(f"--batch must be >= 1, got {batch}")
    dev = torch.device(default_device(device))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r}: CUDA is not available here")
    w, i = bench_defaults(batch)
    try:
        mcfg = replace(
            exp.measure, batch_size=batch, precision=precision, compile=compile, compile_mode=compile_mode, rounds=rounds or exp.measure.rounds,
            warmup=w if warmup is None else warmup, iters=iters or i,
        )
    except ValueError as e:
        raise UserError(f"bench: {e}") from None
    method = get_method(exp.method)
    torch.manual_seed(seed)
    try:
        base = create_backbone(replace(exp.model, pretrained=None))
    except ValueError as e:
        raise UserError(f"bench: {e}") from None
    dense = DenseViT(copy.deepcopy(base))  # timing only: its weights do not matter
    from . import loop, storage
    from methods.checkpoint import load_method_checkpoint

    cfg = method.resolve(exp.method_config, base, dev, loop.cache_dir(exp))
    model = method.build_model(cfg, base)
    weights = "random"
    if checkpoint:
        try:
            found = load_method_checkpoint(method, cfg, model, storage.fetch(checkpoint), layout)
        except CheckpointError as e:
            raise UserError(str(e)) from None
        weights = f"{checkpoint} ({found} layout)"
    sparse = method.inference_model(model.eval(), cfg).to(dev).eval()
    dense = dense.to(dev).eval()
    image = (3, *base.patch_embed.img_size)
    start = time.perf_counter()
    figures = bench_pair(sparse, dense, image, dev, mcfg, batch)
    seconds = time.perf_counter() - start
    if profile:
        x = torch.randn(batch, *image, device=dev)
        figures["profile"] = {name: profile_ops(m, x, mcfg, top=profile) for name, m in (("sparse", sparse), ("dense", dense))}
    return {
        "method": exp.method, "backbone": exp.model.name, "setting": _plain(dataclasses.asdict(cfg)),
        "backbone_config": {k: v for k, v in dataclasses.asdict(exp.model).items() if v is not None and k != "pretrained"},
        "image_size": list(image[1:]), "batch": batch, "precision": precision, "compile": compile,
        "compile_mode": mcfg.compile_mode if compile else None, "device": str(dev),
        "weights": weights, "rounds": mcfg.rounds, "warmup": mcfg.warmup, "iters": mcfg.iters,
        "seconds": seconds, "machine": machine_record(dev), **figures,
    }


def format_bench(r: dict[str, Any]) -> str:
    """The human-readable table: both models side by side, their spreads, and the ratios."""
    mode = "eager" if not r["compile"] else "compiled" + ("" if r.get("compile_mode") in (None, "default") else f" ({r['compile_mode']})")
    lines = [
        f"{r['method']} on {r['backbone']} ({r['image_size'][0]} px), batch {r['batch']}, {r['precision']}, {mode}, "
        f"{r['device']} ({r['machine']['torch_threads']} threads), {r['weights']} weights, "
        f"{r['rounds']} interleaved rounds of {r['iters']} timed calls ({r['seconds']:.0f} s)",
    ]
    rows = [
        ("", r["method"], "dense", "ratio"),
        ("latency (ms/batch)", f"{r['latency_ms']:.3f} ±{r['latency_spread']:.1%}", f"{r['dense_latency_ms']:.3f} ±{r['dense_latency_spread']:.1%}",
         f"{r['dense_latency_ms'] / r['latency_ms']:.3f}x"),
        ("throughput (img/s)", f"{r['throughput_ips']:.1f} ±{r['throughput_spread']:.1%}",
         f"{r['dense_throughput_ips']:.1f} ±{r['dense_throughput_spread']:.1%}", f"{r['throughput_ips'] / r['dense_throughput_ips']:.3f}x"),
        ("GFLOPs (MACs)", f"{r['gflops']:.3f}", f"{r['dense_gflops']:.3f}", f"bound {r['flops_bound']:.3f}x"),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines += ["  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    lines.append(
        f"  speed-up {r['speedup']:.3f}x (rounds {r['speedup_min']:.3f}-{r['speedup_max']:.3f}, spread {r['speedup_spread']:.1%}), "
        f"FLOPs bound {r['flops_bound']:.3f}x, efficiency {r['efficiency']:.3f}"
    )
    if r["device"].startswith("cuda") and r["batch"] <= 32 and r.get("compile_mode") not in ("reduce-overhead", "max-autotune"):
        lines.append(
            "  note: on a GPU at small batches these times are mostly the host launching kernels, so a method's extra small "
            "operators weigh more than its saved work; --compile reduce-overhead (CUDA graphs) takes the launches out"
        )
    for name, ops in r.get("profile", {}).items():
        lines.append(f"  {r['method'] if name == 'sparse' else 'dense'}: top operators by self time per forward")
        width = max(len(o["op"]) for o in ops)
        lines += [f"    {o['op']:<{width}}  {o['self_ms']:9.3f} ms  {o['share']:6.1%}  {o['calls']:7.1f} calls" for o in ops]
    return "\n".join(lines)
