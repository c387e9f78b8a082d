"""Measure what really runs: latency, throughput and fvcore GFLOPs, sparse beside dense.

Models are timed in the same process on the same device, in eval mode under ``no_grad``, with random
inputs (as DynamicViT's ``calc_flops.py`` and ToMe's ``benchmark``), synchronizing around each timed
call on CUDA. They are interleaved call by call: each round warms every model up, then runs cycles
in which every model is timed once, back to back, the order rotating from cycle to cycle. A model's
figure is the median of its calls in each round, then the median over rounds, with its spread
``(max - min) / median`` over rounds; a ratio to the dense model (speed-up) is taken cycle by cycle,
against the dense call beside it, and pooled by its median over every cycle of every round: a burst
of load from another process lasts longer than one call, so it hits both sides of a cycle's ratio
or just one cycle, which the median drops. (Round by round, as before 2026-11-22, the same figures
spread 17-90% between repeated measurements on the 2-core VM; cycle by cycle, 4-7%.) GFLOPs are
fvcore MACs (the convention of every paper in this field) of one image through the eval-mode graph,
so gathered-away tokens are not counted.

On CPU, timing first sets glibc's malloc to keep the memory it frees (``hold_freed_memory``): by
default it hands big blocks back to the kernel, so every forward page-faults its activations in again
(a cost that scales with activation bytes, not FLOPs: it favoured pruned models and varied between
two copies of one model). jemalloc and tcmalloc, which PyTorch recommends for CPU inference, keep
such memory too.

Precision ``bf16``/``fp16`` times under ``torch.autocast`` with that dtype (the model's weights stay
fp32; autocast casts them once per timed loop); ``compile`` wraps every timed model in
``torch.compile`` (static shapes, in ``compile_mode``: ``reduce-overhead`` adds CUDA graphs) alike,
compiled before the first timed round, whose output is checked there against the eager model's
(``CompiledOutputMismatch`` beyond ``COMPILE_TOLERANCE``).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import statistics
import time
from collections.abc import Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

__all__ = [
    "MeasureConfig", "PRECISIONS", "COMPILE_MODES", "measure_pair", "bench_pair", "bench_models", "count_gflops", "time_forward",
    "time_rounds", "Timed", "spread", "NOISY_SPREAD", "profile_ops", "hold_freed_memory", "CompiledOutputMismatch", "COMPILE_TOLERANCE",
]

_logger = logging.getLogger(__name__)

#: ``MeasureConfig.precision`` -> the autocast dtype (None: plain fp32).
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

#: ``torch.compile``'s modes. ``reduce-overhead`` replays each graph as a CUDA graph: one launch
#: instead of hundreds, which is what a launch-bound GPU forward (small batches) needs; on a CPU it
#: is the default mode.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class MeasureConfig:
    """How to time a model.

    Attributes:
        batch_size: batch for throughput (images/s); a trial's latency always uses batch 1.
        warmup: untimed forward passes of each model at the start of each round.
        iters: timed cycles per round, one forward of each model each (a model's median call is
            its figure for the round; ratios are taken cycle by cycle).
        rounds: interleaved rounds; the median over rounds is reported, with its spread.
        amp: time under autocast in the device's usual half type (fp16 on CUDA, bf16 on CPU);
            ``precision`` names the type explicitly and wins when not fp32.
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast with that dtype).
        compile: ``torch.compile`` every timed model alike (the dense one too).
        compile_mode: ``torch.compile``'s mode (``COMPILE_MODES``); only with ``compile``.
    """

    batch_size: int = 64
    warmup: int = 10
    iters: int = 30
    rounds: int = 3
    amp: bool = False
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"

    def __post_init__(self) -> None:
        for name in ("batch_size", "iters", "rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"measure.{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"measure.warmup must be >= 0, got {self.warmup}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"measure.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"measure.compile_mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}")
        if self.compile_mode != "default" and not self.compile:
            raise ValueError(f"measure.compile_mode {self.compile_mode!r} needs measure.compile: true")

    def autocast_dtype(self, device: torch.device | str) -> torch.dtype | None:
        """The dtype to autocast to on ``device`` (None: fp32, no autocast)."""
        if PRECISIONS[self.precision] is not None:
            return PRECISIONS[self.precision]
        if self.amp:
            return torch.float16 if torch.device(device).type == "cuda" else torch.bfloat16
        return None


#: glibc ``mallopt`` parameters (malloc.h) and what timing sets them to.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_HELD: bool | None = None  # None: not tried yet in this process


def hold_freed_memory() -> bool:
    """Keep this process's freed heap memory mapped (glibc: no ``mmap``'d blocks, no trimming); once,
    process-wide, for good. Returns whether it is in effect (False off glibc, e.g. musl or macOS).

    glibc serves a large block with fresh ``mmap``'d pages (above a threshold that adapts up to
    32 MiB) and trims freed heap past another; a forward that frees its activations and allocates
    them again then takes a minor page fault for every 4 KiB of them, each zeroed by the kernel.
    Measured on the 2-core CPU VM: DeiT-S, batch 32, 104k-151k faults per dense forward and 28k for
    DynamicViT (rho 0.7), which timed it at 1.57-1.73x against a 1.54x FLOPs bound, and two copies
    of the dense model 10% apart; with this, 0 faults, 1.55x and 1%. (The tiny quickstart ViT at
    batch 64: 3088 faults per dense forward, 0 for DynamicViT.) Not a guarantee: a 64 MiB block
    was still faulted in by 1-2 calls in 8 on one torch thread (tests/methods/test_measure.py), and
    by most calls in a process whose heap ~600 tests had shaped. Memory the process has used stays
    with it until it exits, which suits a process that measures."""
    global _HELD
    if _HELD is None:
        _HELD = False
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c"))
            libc.gnu_get_libc_version  # noqa: B018  (glibc's; others' mallopt differ or are absent)
        except (OSError, AttributeError, TypeError):
            return _HELD
        settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 64 << 20))
        _HELD = all(libc.mallopt(param, value) == 1 for param, value in settings)
        _logger.debug("glibc malloc holds freed memory while timing: %s", _HELD)
    return _HELD


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def _timing(device: torch.device):
    """What every timing runs inside. CPU: freed memory held (``hold_freed_memory``, for good).
    CUDA: ``cudnn.benchmark`` on (restored after), so cuDNN times its algorithms for each shape on
    the first, untimed, call, as timm's ``benchmark.py`` does. Without it, the patch embedding of
    DeiT-S at batch 256 in bf16 ran cuDNN's generic ``implicit_convolve_sgemm`` at 1.65 ms, 12% of
    the dense forward on an H100, a fixed cost that dilutes every method's speed-up."""
    if device.type == "cpu":
        hold_freed_memory()
    before = torch.backends.cudnn.benchmark
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def _timed_call(model: nn.Module, x: torch.Tensor) -> float:
    """Seconds of one forward of ``model`` on ``x``, synchronized around it on CUDA."""
    _sync(x.device)
    start = time.perf_counter()
    model(x)
    _sync(x.device)
    return time.perf_counter() - start


def _autocast(device: torch.device, amp: bool | torch.dtype | None):
    if amp is None or amp is False:
        return nullcontext()
    dtype = amp if isinstance(amp, torch.dtype) else (torch.float16 if device.type == "cuda" else torch.bfloat16)
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def time_forward(model: nn.Module, x: torch.Tensor, warmup: int, iters: int, amp: bool | torch.dtype | None = False) -> float:
    """Median seconds of one forward of ``model`` on ``x`` over ``iters`` timed calls.

    ``amp``: False/None for fp32, a dtype to autocast to, or True for the device's usual half type.
    On CPU, freed memory is held first (``hold_freed_memory``)."""
    with _timing(x.device), _autocast(x.device, amp):
        for _ in range(warmup):
            model(x)
        times = [_timed_call(model, x) for _ in range(iters)]
    return statistics.median(times)


def spread(values: list[float]) -> float:
    """``(max - min) / median`` of repeated measurements (0.0 for one): how far repeats disagree."""
    if len(values) < 2:
        return 0.0
    return (max(values) - min(values)) / statistics.median(values)


def _prepared(models: Mapping[str, nn.Module], cfg: MeasureConfig) -> dict[str, nn.Module]:
    out = {}
    for name, model in models.items():
        model.eval()
        out[name] = torch.compile(model, dynamic=False, mode=cfg.compile_mode) if cfg.compile else model
    return out


@dataclass(frozen=True)
class Timed:
    """What ``time_rounds`` timed: ``calls[name][r][k]``, the seconds of model ``name``'s ``k``-th
    timed call in round ``r``; call ``k`` of every model ran in the same cycle, back to back."""

    calls: dict[str, list[list[float]]]

    def seconds(self, name: str) -> list[float]:
        """Round by round: the median of ``name``'s calls."""
        return [statistics.median(r) for r in self.calls[name]]

    def cycle_ratios(self, name: str, reference: str) -> list[list[float]]:
        """Round by round, cycle by cycle: the reference's seconds over ``name``'s (> 1: ``name`` is faster)."""
        return [[d / s for d, s in zip(ref, own)] for ref, own in zip(self.calls[reference], self.calls[name])]

    def ratio(self, name: str, reference: str) -> tuple[float, list[float]]:
        """``name``'s speed relative to ``reference``: the median over every cycle of every round,
        and each round's median (their min, max and spread say how far rounds disagree)."""
        per_round = self.cycle_ratios(name, reference)
        return statistics.median([r for rnd in per_round for r in rnd]), [statistics.median(r) for r in per_round]


@torch.no_grad()
def time_rounds(
    models: Mapping[str, nn.Module], x: torch.Tensor, cfg: MeasureConfig, warmup: int | None = None, iters: int | None = None,
) -> Timed:
    """Every (already prepared) model on ``x``, timed call by call, interleaved (``Timed``).

    Each model runs once before the first round (where ``torch.compile`` compiles), untimed. A round
    runs ``warmup`` untimed calls of each model, then ``iters`` cycles that time every model once,
    back to back; the order rotates by one model each cycle, and each round starts one model further
    on, so running first, or right after a given model, favours none."""
    warmup = cfg.warmup if warmup is None else warmup
    iters = cfg.iters if iters is None else iters
    amp = cfg.autocast_dtype(x.device)
    names = list(models)
    calls: dict[str, list[list[float]]] = {n: [] for n in names}
    with _timing(x.device), _autocast(x.device, amp):
        for name in names:
            _first_call(name, models[name], x, amp)
        for r in range(cfg.rounds):
            for _ in range(warmup):
                for name in names:
                    models[name](x)
            for name in names:
                calls[name].append([])
            for k in range(iters):
                shift = (r + k) % len(names)
                for name in names[shift:] + names[:shift]:
                    calls[name][-1].append(_timed_call(models[name], x))
    return Timed(calls)


#: Largest ``max |compiled - eager|`` of the logits, relative to ``max(1, max |eager|)``, that
#: ``torch.compile`` may add: fp32 (inductor's reordered sums: ~1e-7 measured on every method), and
#: autocast's half types (both sides round to 8 or 11 bits, at different points).
COMPILE_TOLERANCE: dict[torch.dtype | None, float] = {None: 1e-3, torch.bfloat16: 0.1, torch.float16: 0.05}


class CompiledOutputMismatch(ValueError):
    """``torch.compile`` changed what a timed model computes: its timings would not be the model's."""


def _logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def _first_call(name: str, model: nn.Module, x: torch.Tensor, amp: torch.dtype | None) -> None:
    """The untimed first call (where ``torch.compile`` compiles). A compiled model's output is checked
    against its eager module's on the same input: a compiled graph that drops a token-selection
    branch or miscompiles a gather would otherwise be timed as if it were the method."""
    got = model(x)
    eager = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule keeps the eager module
    if eager is None:
        return
    ref, got = _logits(eager(x)).float(), _logits(got).float()
    diff = (ref - got).abs().max().item() if ref.shape == got.shape else float("inf")
    bound = COMPILE_TOLERANCE[amp] * max(1.0, ref.abs().max().item())
    if not diff <= bound:  # NaN fails too
        raise CompiledOutputMismatch(
            f"torch.compile changed model {name!r}'s output at input {tuple(x.shape)}: max |compiled - eager| logit "
            f"{diff:.3g} > {bound:.3g} (shapes {tuple(got.shape)} and {tuple(ref.shape)}); measure it without compile"
        )


def _summary(timed: Timed, batch: int, prefix_of: Mapping[str, str]) -> dict[str, float]:
    """Flat figures of timed rounds: per model ``<p>latency_ms`` (one forward of ``batch``),
    ``<p>throughput_ips`` and their spreads."""
    out: dict[str, float] = {}
    for name, p in prefix_of.items():
        s = timed.seconds(name)
        ips = [batch / t for t in s]
        out[f"{p}latency_ms"] = statistics.median(s) * 1e3
        out[f"{p}latency_spread"] = spread(s)
        out[f"{p}throughput_ips"] = statistics.median(ips)
        out[f"{p}throughput_spread"] = spread(ips)
    return out


def bench_models(
    models: Mapping[str, nn.Module], image_shape: tuple[int, int, int], device: torch.device, cfg: MeasureConfig,
    batch: int | None = None, reference: str = "dense", gflops: bool = True,
) -> dict[str, dict[str, float]]:
    """Several models timed interleaved at one ``batch`` (default ``cfg.batch_size``) beside ``reference``.

    Returns per model: ``latency_ms`` (one forward of the batch, median over rounds),
    ``throughput_ips``, their ``*_spread``, ``gflops``; and for every other model ``speedup`` (its
    throughput over the reference's, cycle by cycle, median over all rounds), ``speedup_min``/
    ``speedup_max``/``speedup_spread`` (over the rounds' medians), ``flops_bound`` (reference GFLOPs
    over its own) and ``efficiency`` (speed-up over bound).
    """
    if reference not in models:
        raise ValueError(f"reference model {reference!r} is not among {list(models)}")
    batch = cfg.batch_size if batch is None else batch
    x = torch.randn(batch, *image_shape, device=device)
    timed = time_rounds(_prepared(models, cfg), x, cfg)
    out = {}
    for name in models:
        row = _summary(timed, batch, {name: ""})
        if gflops:
            row["gflops"] = count_gflops(models[name], image_shape, device)
        if name != reference:
            pooled, r = timed.ratio(name, reference)
            row.update(speedup=pooled, speedup_min=min(r), speedup_max=max(r), speedup_spread=spread(r))
        out[name] = row
    if gflops:
        for name, row in out.items():
            if name != reference:
                row["flops_bound"] = out[reference]["gflops"] / row["gflops"]
                row["efficiency"] = row["speedup"] / row["flops_bound"]
    return out


def bench_pair(
    sparse: nn.Module, dense: nn.Module, image_shape: tuple[int, int, int], device: torch.device, cfg: MeasureConfig,
    batch: int | None = None,
) -> dict[str, float]:
    """``sparse`` beside ``dense`` at one ``batch`` (``prunetune bench``): flat figures.

    ``latency_ms``/``dense_latency_ms`` (one forward of the batch), ``throughput_ips``/
    ``dense_throughput_ips``, each with ``*_spread``; ``speedup`` (sparse over dense throughput,
    cycle-by-cycle ratio, median) with ``speedup_min``/``speedup_max``/``speedup_spread``; ``gflops``,
    ``dense_gflops``, ``flops_bound`` (dense over sparse GFLOPs), ``efficiency`` (speed-up over bound)."""
    rows = bench_models({"dense": dense, "sparse": sparse}, image_shape, device, cfg, batch)
    out = dict(rows["sparse"])
    out.update({f"dense_{k}": v for k, v in rows["dense"].items()})
    return out


@torch.no_grad()
def profile_ops(model: nn.Module, x: torch.Tensor, cfg: MeasureConfig, iters: int = 5, top: int = 15) -> list[dict[str, float | str]]:
    """Where one forward's time goes: ``torch.profiler`` over ``iters`` forwards of ``model`` (prepared
    as for timing: eval, compiled if ``cfg.compile``, autocast) after a warm-up, the ``top`` operators
    by self time. Rows: ``op``, ``calls`` and ``self_ms`` per forward, ``share`` of the profiled self time.
    Host syncs show up as ``aten::item``/``aten::_local_scalar_dense``, copies as ``aten::copy_``."""
    from torch.profiler import ProfilerActivity, profile

    run = _prepared({"m": model}, cfg)["m"]
    amp = cfg.autocast_dtype(x.device)
    cuda = x.device.type == "cuda"
    with _timing(x.device), _autocast(x.device, amp):
        for _ in range(max(1, cfg.warmup)):
            run(x)
        _sync(x.device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            for _ in range(iters):
                run(x)
            _sync(x.device)
    events = prof.key_averages()

    def self_us(e) -> float:
        return float(getattr(e, "self_device_time_total", 0.0) if cuda else e.self_cpu_time_total)

    total = sum(self_us(e) for e in events) or 1.0
    rows = sorted(events, key=self_us, reverse=True)[:top]
    return [{"op": e.key, "calls": e.count / iters, "self_ms": self_us(e) / 1e3 / iters, "share": self_us(e) / total} for e in rows]


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
            return _logits(self.inner(x))

    try:
        analysis = FlopCountAnalysis(_Logits(model), x)
        analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_flop_jit)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        with torch.no_grad():
            return analysis.total() / 1e9
    finally:
        model.train(was_training)


#: Rounds whose ratios to the dense model disagree by more than this (``spread``) were timed on a busy
#: machine: ``measure_pair`` says so in a warning. On the idle 2-core VM a trial's rounds agree within
#: 0.4-5%; with three times more runnable threads than cores a 1-ms forward took 2.4, 10.8 or 420 ms
#: by the scheduler's luck, and a dense model timed beside itself came out 0.21-4.34x over 5 cycles and
#: 0.30-2.53x over 30 (40 repeats each, 2026-11-24).
NOISY_SPREAD = 0.10


def measure_pair(
    sparse: nn.Module,
    dense: nn.Module,
    image_shape: tuple[int, int, int],
    device: torch.device,
    cfg: MeasureConfig = MeasureConfig(),
) -> dict[str, float]:
    """Latency, throughput and GFLOPs of ``sparse`` beside ``dense``, measured here, now (what a trial records).

    Returns:
        ``latency_ms`` (batch 1, median over rounds), ``throughput_ips`` (images/s at
        ``cfg.batch_size``), the same two as ``dense_latency_ms``/``dense_throughput_ips``, each with
        its ``*_spread`` over rounds; ``speedup`` (dense over sparse latency) and ``throughput_ratio``
        (sparse over dense throughput), each the median of cycle-by-cycle ratios, with
        ``speedup_spread``/``throughput_ratio_spread`` over rounds; ``gflops``, ``dense_gflops``,
        ``flops_bound`` (dense over sparse GFLOPs) and ``efficiency`` (throughput ratio over bound).
        On a noisy machine the ratios are the robust figures: both sides of each are timed back to back;
        when even their rounds disagree by more than ``NOISY_SPREAD``, a warning says the figures
        are not to be trusted.
    """
    names = {"sparse": "", "dense": "dense_"}
    models = _prepared({"sparse": sparse, "dense": dense}, cfg)
    one = torch.randn(1, *image_shape, device=device)
    lat = time_rounds(models, one, cfg)
    if cfg.batch_size == 1:
        thr = lat
    else:
        batch = torch.randn(cfg.batch_size, *image_shape, device=device)
        thr = time_rounds(models, batch, cfg, max(1, cfg.warmup // 2), max(3, cfg.iters // 3))
    by_lat, by_thr = _summary(lat, 1, names), _summary(thr, cfg.batch_size, names)
    (speedup, speedup_rounds), (ratio, ratio_rounds) = lat.ratio("sparse", "dense"), thr.ratio("sparse", "dense")
    result = {
        "latency_ms": by_lat["latency_ms"], "latency_spread": by_lat["latency_spread"],
        "throughput_ips": by_thr["throughput_ips"], "throughput_spread": by_thr["throughput_spread"],
        "dense_latency_ms": by_lat["dense_latency_ms"], "dense_latency_spread": by_lat["dense_latency_spread"],
        "dense_throughput_ips": by_thr["dense_throughput_ips"], "dense_throughput_spread": by_thr["dense_throughput_spread"],
        "speedup": speedup, "speedup_spread": spread(speedup_rounds),
        "throughput_ratio": ratio, "throughput_ratio_spread": spread(ratio_rounds),
        "gflops": count_gflops(sparse, image_shape, device),
        "dense_gflops": count_gflops(dense, image_shape, device),
    }
    result["flops_bound"] = result["dense_gflops"] / result["gflops"]
    result["efficiency"] = result["throughput_ratio"] / result["flops_bound"]
    _logger.info("measured on %s: %s", device, {k: round(v, 4) for k, v in result.items()})
    noisy = {k: result[k] for k in ("speedup_spread", "throughput_ratio_spread") if result[k] > NOISY_SPREAD}
    if noisy:
        _logger.warning(
            "timing on %s was noisy: %s over %d rounds (more than %.0f%%), so the machine was busy; "
            "trust these ratios only after measuring again on a quiet machine or with more measure.iters/rounds",
            device, ", ".join(f"{k} {v:.0%}" for k, v in noisy.items()), cfg.rounds, 100 * NOISY_SPREAD,
        )
    return result
