"""Measure what really runs: latency, throughput and fvcore GFLOPs, sparse beside dense.

Both models are timed in the same process on the same device, in eval mode under ``no_grad``, with
random inputs (as DynamicViT's ``calc_flops.py`` and ToMe's ``benchmark``), synchronizing around
each timed call on CUDA. Dense and sparse runs are interleaved in several rounds and the median is
kept, so a noisy machine shifts both alike. GFLOPs are fvcore MACs (the convention of every paper
in this field) of one image through the eval-mode graph, so gathered-away tokens are not counted.
"""
from __future__ import annotations

import logging
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["MeasureConfig", "measure_pair", "count_gflops", "time_forward"]

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MeasureConfig:
    """How to time a model.

    Attributes:
        batch_size: batch for throughput (images/s); latency always uses batch 1.
        warmup: untimed forward passes before each timed round.
        iters: timed forward passes per round.
        rounds: interleaved dense/sparse rounds; the median round is reported.
        amp: time under autocast (fp16 on CUDA, bf16 on CPU).
    """

    batch_size: int = 64
    warmup: int = 10
    iters: int = 30
    rounds: int = 3
    amp: bool = False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_forward(model: nn.Module, x: torch.Tensor, warmup: int, iters: int, amp: bool = False) -> float:
    """Median seconds of one forward of ``model`` on ``x`` over ``iters`` timed calls."""
    dtype = torch.float16 if x.device.type == "cuda" else torch.bfloat16
    ctx = torch.autocast(x.device.type, dtype=dtype) if amp else nullcontext()
    times = []
    with ctx:
        for _ in range(warmup):
            model(x)
        for _ in range(iters):
            _sync(x.device)
            start = time.perf_counter()
            model(x)
            _sync(x.device)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _sdpa_flop_jit(inputs, outputs) -> int:
    """fvcore handle for ``aten::scaled_dot_product_attention``: QK^T plus AV, in MACs."""
    from fvcore.nn.jit_handles import get_shape

    q, k = get_shape(inputs[0]), get_shape(inputs[1])
    *batch, n_q, d = q
    n_k = k[-2]
    b = 1
    for s in batch:
        b *= s
    return 2 * b * n_q * n_k * d


def count_gflops(model: nn.Module, image_shape: tuple[int, int, int], device: torch.device | str = "cpu") -> float:
    """fvcore GMACs of one ``[1, *image_shape]`` forward in eval mode (SDPA attention included)."""
    from fvcore.nn import FlopCountAnalysis

    was_training = model.training
    model.eval()
    x = torch.randn(1, *image_shape, device=device)

    class _Logits(nn.Module):  # fvcore traces tensors out, not MethodOutput
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x):
            out = self.inner(x)
            return out.logits if hasattr(out, "logits") else out

    try:
        analysis = FlopCountAnalysis(_Logits(model), x)
        analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_flop_jit)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        with torch.no_grad():
            return analysis.total() / 1e9
    finally:
        model.train(was_training)


def measure_pair(
    sparse: nn.Module,
    dense: nn.Module,
    image_shape: tuple[int, int, int],
    device: torch.device,
    cfg: MeasureConfig = MeasureConfig(),
) -> dict[str, float]:
    """Latency, throughput and GFLOPs of ``sparse`` beside ``dense``, measured here, now.

    Returns:
        ``latency_ms`` (batch 1, median), ``throughput_ips`` (images/s at ``cfg.batch_size``),
        the same two as ``dense_latency_ms``/``dense_throughput_ips``, ``speedup`` (dense latency
        over sparse latency), ``throughput_ratio``, ``gflops`` and ``dense_gflops``.
    """
    models = {"sparse": sparse.eval(), "dense": dense.eval()}
    one = torch.randn(1, *image_shape, device=device)
    batch = torch.randn(cfg.batch_size, *image_shape, device=device)
    lat: dict[str, list[float]] = {k: [] for k in models}
    thr: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(cfg.rounds):
        for name, model in models.items():
            lat[name].append(time_forward(model, one, cfg.warmup, cfg.iters, cfg.amp))
            thr[name].append(cfg.batch_size / time_forward(model, batch, max(1, cfg.warmup // 2), max(3, cfg.iters // 3), cfg.amp))
    latency = {k: statistics.median(v) * 1e3 for k, v in lat.items()}
    throughput = {k: statistics.median(v) for k, v in thr.items()}
    result = {
        "latency_ms": latency["sparse"],
        "throughput_ips": throughput["sparse"],
        "dense_latency_ms": latency["dense"],
        "dense_throughput_ips": throughput["dense"],
        "speedup": latency["dense"] / latency["sparse"],
        "throughput_ratio": throughput["sparse"] / throughput["dense"],
        "gflops": count_gflops(sparse, image_shape, device),
        "dense_gflops": count_gflops(dense, image_shape, device),
    }
    _logger.info("measured on %s: %s", device, {k: round(v, 4) for k, v in result.items()})
    return result
