"""Measurement: the keys and their relations (no speed thresholds: those belong in benchmarks), and MACs."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from methods import MeasureConfig, MethodOutput, count_gflops, get_method, measure_pair
from methods.dynamicvit import DynamicViTConfig

IMAGE = (3, 32, 32)
N_PATCHES, C, DEPTH, CLASSES, PATCH_IN = 64, 96, 6, 10, 3 * 4 * 4
KEYS = {
    "latency_ms", "throughput_ips", "dense_latency_ms", "dense_throughput_ips",
    "speedup", "throughput_ratio", "gflops", "dense_gflops",
    "latency_spread", "throughput_spread", "dense_latency_spread", "dense_throughput_spread",
    "speedup_spread", "throughput_ratio_spread", "flops_bound", "efficiency",
}
SPREADS = {k for k in KEYS if k.endswith("_spread")}


def _block_macs(n: int) -> int:
    """methods.md section 0: one ViT block on ``n`` tokens is ``12 n C^2 + 2 n^2 C`` MACs."""
    return 12 * n * C**2 + 2 * n**2 * C


def _dense_macs() -> int:
    return DEPTH * _block_macs(1 + N_PATCHES) + N_PATCHES * PATCH_IN * C + C * CLASSES


def _dynamicvit_macs(loc: tuple[int, ...], counts: list[int]) -> int:
    """Blocks on the shrinking sequence plus each predictor's linear layers on the tokens it scores."""
    tokens = [1 + N_PATCHES] * DEPTH
    patches_in = []
    for k, start in enumerate(loc):
        patches_in.append(tokens[start] - 1)
        for i in range(start, DEPTH):
            tokens[i] = 1 + counts[k]
    predictor = lambda n: n * (C * C + C * C // 2 + (C // 2) * (C // 4) + (C // 4) * 2)  # noqa: E731
    return (
        sum(_block_macs(n) for n in tokens) + sum(predictor(n) for n in patches_in)
        + N_PATCHES * PATCH_IN * C + C * CLASSES
    )


def _pair(tiny_vit, keep_ratio: float = 0.5):
    dense = get_method("dense").build_model(get_method("dense").config_cls(), copy.deepcopy(tiny_vit))
    cfg = DynamicViTConfig(keep_ratio=keep_ratio, pruning_loc=(1, 3, 5))
    return get_method("dynamicvit").build_model(cfg, tiny_vit), dense


def test_measure_pair_returns_consistent_positive_metrics(tiny_vit):
    sparse, dense = _pair(tiny_vit)
    cfg = MeasureConfig(batch_size=16, warmup=2, iters=5, rounds=1)
    result = measure_pair(sparse, dense, IMAGE, torch.device("cpu"), cfg)

    assert set(result) == KEYS
    assert all(isinstance(v, float) and math.isfinite(v) and v > 0 for k, v in result.items() if k not in SPREADS), result
    assert all(result[k] == 0.0 for k in SPREADS)  # one round: nothing to disagree with
    # The ratios are medians of cycle-by-cycle ratios, not ratios of the medians above: their
    # arithmetic is checked on a fake clock below.
    assert result["gflops"] < result["dense_gflops"]
    assert result["dense_gflops"] == pytest.approx(count_gflops(dense, IMAGE))
    assert result["flops_bound"] == pytest.approx(result["dense_gflops"] / result["gflops"])
    assert result["efficiency"] == pytest.approx(result["throughput_ratio"] / result["flops_bound"])


def test_dense_gflops_match_the_analytic_mac_count(tiny_vit):
    """Within 15% of the section 0 formula: fails if fvcore silently skipped SDPA (about 10% here) or counted FLOPs."""
    gflops = count_gflops(tiny_vit, IMAGE)
    assert gflops * 1e9 == pytest.approx(_dense_macs(), rel=0.15)
    attention = DEPTH * 2 * (1 + N_PATCHES) ** 2 * C
    assert abs(gflops * 1e9 - _dense_macs()) < attention / 2  # tighter than 15%: SDPA is counted


@pytest.mark.parametrize("keep_ratio", [0.7, 0.5])
def test_dynamicvit_gflops_match_the_analytic_count_of_the_gathered_graph(tiny_vit, keep_ratio):
    sparse, _ = _pair(tiny_vit, keep_ratio)
    expected = _dynamicvit_macs((1, 3, 5), sparse.keep_counts)
    assert count_gflops(sparse, IMAGE) * 1e9 == pytest.approx(expected, rel=0.15)


class _Clocked(torch.nn.Module):
    """A model whose forward advances a fake clock by ``ms_per_image`` per image and records how it was called."""

    def __init__(self, clock: list[float], ms_per_image: float, width: int) -> None:
        super().__init__()
        self.clock, self.ms = clock, ms_per_image
        self.fc = torch.nn.Linear(3 * 8 * 8, width)
        self.calls: list[tuple[int, bool, bool]] = []

    def forward(self, x):
        self.calls.append((x.shape[0], self.training, torch.is_grad_enabled()))
        self.clock[0] += self.ms * 1e-3 * x.shape[0]
        return MethodOutput(self.fc(x.flatten(1)))


def test_measure_pair_times_each_model_in_its_own_slot_in_eval_mode(monkeypatch):
    """Swapping the slots, timing in train mode or with gradients, or a latency at another batch than 1
    would each change a figure here: the clock only moves by what each model costs per image."""
    import types

    from methods import measure as measure_module

    clock = [0.0]
    monkeypatch.setattr(measure_module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    sparse, dense = _Clocked(clock, 1.0, width=4), _Clocked(clock, 3.0, width=64)
    sparse.train(), dense.train()
    cfg = MeasureConfig(batch_size=8, warmup=1, iters=3, rounds=2)
    out = measure_pair(sparse, dense, (3, 8, 8), torch.device("cpu"), cfg)
    assert out["latency_ms"] == pytest.approx(1.0) and out["dense_latency_ms"] == pytest.approx(3.0)  # batch 1
    assert out["throughput_ips"] == pytest.approx(1000.0) and out["dense_throughput_ips"] == pytest.approx(1000.0 / 3)
    assert out["speedup"] == pytest.approx(3.0) and out["throughput_ratio"] == pytest.approx(3.0)
    assert out["gflops"] < out["dense_gflops"]
    for model in (sparse, dense):
        assert {b for b, _, _ in model.calls} >= {1, 8}
        assert not any(training or grad for _, training, grad in model.calls)


class _Slowing(_Clocked):
    """``_Clocked`` that costs ``later_ms`` per image from its ``after + 1``-th call on (a machine getting busy)."""

    def __init__(self, clock, ms_per_image, width, after: int, later_ms: float) -> None:
        super().__init__(clock, ms_per_image, width)
        self.after, self.later_ms = after, later_ms

    def forward(self, x):
        if len(self.calls) == self.after:
            self.ms = self.later_ms
        return super().forward(x)


def test_rounds_that_disagree_are_warned_about_and_steady_ones_are_not(monkeypatch, caplog):
    """Latency at batch 1: the sparse model's calls are its first (untimed), then per round 1 warm-up
    and 3 timed. From its 6th call (round 2's warm-up) it costs 2 ms instead of 1, beside a steady
    3 ms: the rounds' speed-ups are 3.0 and 1.5, spread (3.0 - 1.5) / 2.25 = 2/3; the throughput
    pass after it runs at 2 ms throughout (1.5 both rounds, spread 0)."""
    clock = _fake_clock(monkeypatch)
    cfg = MeasureConfig(batch_size=8, warmup=1, iters=3, rounds=2)
    with caplog.at_level("WARNING", logger="methods.measure"):
        out = measure_pair(_Slowing(clock, 1.0, 4, after=5, later_ms=2.0), _Clocked(clock, 3.0, 64), (3, 8, 8), torch.device("cpu"), cfg)
    assert out["speedup_spread"] == pytest.approx(2 / 3) and out["throughput_ratio_spread"] == pytest.approx(0.0)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "speedup_spread 67% over 2 rounds" in warning and "throughput_ratio_spread" not in warning

    caplog.clear()
    clock = _fake_clock(monkeypatch)  # a fresh one: fvcore's trace of the models above advanced the old one by a traced tensor
    with caplog.at_level("WARNING", logger="methods.measure"):
        measure_pair(_Clocked(clock, 1.0, 4), _Clocked(clock, 3.0, 64), (3, 8, 8), torch.device("cpu"), cfg)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


# ---- bench: one batch, interleaved rounds, spreads, cycle-by-cycle ratios (fake clock: arithmetic, not speed)

def _fake_clock(monkeypatch) -> list[float]:
    import types

    from methods import measure as measure_module

    clock = [0.0]
    monkeypatch.setattr(measure_module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    return clock


def test_bench_pair_arithmetic_on_a_fixed_cost_clock(monkeypatch):
    """1 ms vs 3 ms per image at batch 8: 8 / 24 ms per forward, 1000 / 333.3 img/s, speed-up 3;
    GFLOPs are the two heads' MACs, 192*4 and 192*64 (bound 16), so efficiency is 3 / 16."""
    from methods import bench_pair

    clock = _fake_clock(monkeypatch)
    sparse, dense = _Clocked(clock, 1.0, width=4), _Clocked(clock, 3.0, width=64)
    out = bench_pair(sparse, dense, (3, 8, 8), torch.device("cpu"), MeasureConfig(warmup=1, iters=3, rounds=3), batch=8)
    assert out["latency_ms"] == pytest.approx(8.0) and out["dense_latency_ms"] == pytest.approx(24.0)
    assert out["throughput_ips"] == pytest.approx(1000.0) and out["dense_throughput_ips"] == pytest.approx(1000.0 / 3)
    assert out["gflops"] == pytest.approx(192 * 4 / 1e9) and out["dense_gflops"] == pytest.approx(192 * 64 / 1e9)
    assert out["flops_bound"] == pytest.approx(16.0)
    assert out["speedup"] == pytest.approx(3.0) and out["speedup_min"] == pytest.approx(3.0) and out["speedup_max"] == pytest.approx(3.0)
    assert out["efficiency"] == pytest.approx(3.0 / 16.0)
    for k in ("latency_spread", "dense_latency_spread", "throughput_spread", "dense_throughput_spread", "speedup_spread"):
        assert out[k] == pytest.approx(0.0)
    for m in (sparse, dense):  # every timed call at batch 8 (fvcore's trace at batch 1 records a traced tensor)
        assert {b for b, _, _ in m.calls if isinstance(b, int)} == {8}


def test_load_from_other_processes_shows_in_the_spreads_but_not_in_the_pooled_ratio(monkeypatch):
    """The machine slows down as time goes on, as another process's load comes and goes: calls are
    timed in this order (rounds of 3 cycles, the models' order rotating each cycle) and a load
    factor applies to a stretch of consecutive calls, both models alike:

    - round 1 at 1.0x, round 2 at 1.5x except its last cycle (1.0x), round 3 at 1.2x;
    - one burst slows only the dense call of round 3's middle cycle, 4x.

    Each model's figure per round is its median call: 1.0, 1.5, 1.2 times its cost, so its spread is
    (1.5 - 1.0) / 1.2. Every cycle but the burst's has a speed-up of exactly 3 (both sides of a cycle
    share the load), so the pooled median is 3 and the rounds' medians agree (spread 0). Timing each
    model's calls in one block per round instead would have given round 2's four slow calls to three
    dense calls and one sparse one: a speed-up of 4.5 that round."""
    from methods import bench_pair

    clock = _fake_clock(monkeypatch)
    order: list[str] = []
    slow = {2 + 6 + k: 1.5 for k in range(4)}  # after the 2 priming calls and round 1's 6: round 2's first two cycles
    slow.update({2 + 12 + k: 1.2 for k in range(6)})

    class Loaded(_Clocked):
        def forward(self, x):
            if x.shape[0] == 2:  # timed calls (fvcore's trace comes after, at batch 1)
                index = len(order)
                order.append(self.name)
                factor = slow.get(index, 1.0) * (4.0 if index == 2 + 12 + 3 and self.name == "dense" else 1.0)
                self.clock[0] += self.ms * 1e-3 * x.shape[0] * (factor - 1.0)
            return super().forward(x)

    sparse, dense = Loaded(clock, 1.0, width=4), Loaded(clock, 3.0, width=64)
    sparse.name, dense.name = "sparse", "dense"
    out = bench_pair(sparse, dense, (3, 8, 8), torch.device("cpu"), MeasureConfig(warmup=0, iters=3, rounds=3), batch=2)
    cycles = ["dense", "sparse"], ["sparse", "dense"]
    expected_order = ["dense", "sparse"] + [m for r in range(3) for k in range(3) for m in cycles[(r + k) % 2]]
    assert order == expected_order
    assert order[2 + 12 + 3] == "dense"  # the burst hit a dense call
    assert out["latency_ms"] == pytest.approx(2.0 * 1.2) and out["dense_latency_ms"] == pytest.approx(6.0 * 1.2)
    assert out["latency_spread"] == pytest.approx(0.5 / 1.2) and out["dense_latency_spread"] == pytest.approx(0.5 / 1.2)
    ips = [2 / (2e-3 * f) for f in (1.0, 1.5, 1.2)]
    assert out["throughput_spread"] == pytest.approx((max(ips) - min(ips)) / sorted(ips)[1])
    assert out["speedup"] == pytest.approx(3.0) and out["speedup_spread"] == pytest.approx(0.0)
    assert out["speedup_min"] == pytest.approx(3.0) and out["speedup_max"] == pytest.approx(3.0)


class _Recording(torch.nn.Module):
    """Records the autocast state and whether it runs under torch.compile's tracing, per call."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3 * 4 * 4, 5)
        self.seen: list[tuple[bool, torch.dtype, bool]] = []

    def forward(self, x):
        self.seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), torch.compiler.is_compiling()))
        return MethodOutput(self.fc(x.flatten(1)))


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_precision_times_under_autocast_of_that_dtype(precision, dtype):
    from methods import bench_pair

    sparse, dense = _Recording(), _Recording()
    bench_pair(sparse, dense, (3, 4, 4), torch.device("cpu"), MeasureConfig(warmup=1, iters=3, rounds=2, precision=precision), batch=2)
    for m in (sparse, dense):
        timed = m.seen[: 1 + 2 * (1 + 3)]  # the priming call and two rounds; fvcore's trace comes after, in fp32
        assert timed and all(on and d == dtype for on, d, _ in timed), timed


def test_fp32_times_without_autocast_and_bad_settings_are_refused():
    from methods import bench_pair

    sparse, dense = _Recording(), _Recording()
    bench_pair(sparse, dense, (3, 4, 4), torch.device("cpu"), MeasureConfig(warmup=0, iters=3, rounds=1), batch=2)
    assert sparse.seen and not any(on for on, _, _ in sparse.seen)
    assert MeasureConfig(amp=True).autocast_dtype("cpu") == torch.bfloat16
    assert MeasureConfig(amp=True, precision="fp16").autocast_dtype("cpu") == torch.float16
    for bad in ({"precision": "fp8"}, {"rounds": 0}, {"iters": 0}, {"warmup": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            MeasureConfig(**bad)


def test_compile_runs_both_models_through_torch_compile():
    from methods import bench_pair

    sparse, dense = _Recording(), _Recording()
    out = bench_pair(sparse, dense, (3, 4, 4), torch.device("cpu"), MeasureConfig(warmup=1, iters=3, rounds=1, compile=True), batch=2)
    for m in (sparse, dense):
        # priming (compiled), its eager twin for the output check, warm-up + 3 timed calls, then fvcore's eager trace
        priming, check, timed, fvcore_trace = m.seen[0], m.seen[1], m.seen[2:-1], m.seen[-1]
        assert len(timed) == 1 + 3 and priming[2] and all(compiling for _, _, compiling in timed)  # through dynamo's graph
        assert not check[2] and not fvcore_trace[2]  # the output check and GFLOPs run the eager model
    assert math.isfinite(out["speedup"]) and out["speedup"] > 0


class _CompiledDiffers(torch.nn.Module):
    """Adds ``shift`` to its logits only when dynamo traces it: what a miscompiled token selection looks like."""

    def __init__(self, shift: float) -> None:
        super().__init__()
        self.fc, self.shift = torch.nn.Linear(3 * 4 * 4, 5), shift

    def forward(self, x):
        logits = self.fc(x.flatten(1))
        return MethodOutput(logits + self.shift if torch.compiler.is_compiling() else logits)


def test_compiled_model_that_computes_something_else_is_not_timed():
    from methods import bench_pair
    from methods.measure import COMPILE_TOLERANCE, CompiledOutputMismatch

    cfg = MeasureConfig(warmup=0, iters=1, rounds=1, compile=True)
    # The bound is the tolerance times max(1, max |logits|): above half the tolerance whatever the logits, far below 0.5.
    within = bench_pair(_CompiledDiffers(0.5 * COMPILE_TOLERANCE[None]), _Recording(), (3, 4, 4), torch.device("cpu"), cfg, batch=2)
    assert within["speedup"] > 0
    with pytest.raises(CompiledOutputMismatch, match=r"model 'sparse'.* input \(2, 3, 4, 4\): max \|compiled - eager\| logit 0\.5 > "):
        bench_pair(_CompiledDiffers(0.5), _Recording(), (3, 4, 4), torch.device("cpu"), cfg, batch=2)


class _BigActivation(torch.nn.Module):
    """A forward that allocates (and frees) a 64 MiB intermediate: above glibc's largest ``mmap``
    threshold, so by default each call maps fresh pages and faults all 16384 of them in again."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.unsqueeze(0).expand(64, *x.shape) * 2.0).sum()


_FAULTS_PER_CALL = """
import resource, statistics, sys, torch
from methods.measure import time_forward
from {module} import _BigActivation
m, x = _BigActivation(), torch.ones(1 << 18)
timed = sys.argv[1] == "timed"
time_forward(m, x, warmup=3, iters=1) if timed else [m(x) for _ in range(4)]
per_call = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    time_forward(m, x, warmup=0, iters=1) if timed else m(x)
    per_call.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(statistics.median(per_call))
"""


def test_timing_on_cpu_reuses_freed_memory_instead_of_faulting_it_in_every_call():
    """A forward's activations come back from the heap, not from fresh zeroed pages, once timing
    has begun (``hold_freed_memory``): page faults cost time in proportion to the bytes allocated,
    which is not what a method saves (methods/measure.py). Both sides run in a fresh interpreter,
    as a trial's worker or ``prunetune bench`` does (this test process's heap is whatever the tests
    before it left)."""
    import resource
    import subprocess
    import sys
    from pathlib import Path

    from methods import measure as measure_module

    if not measure_module.hold_freed_memory():
        pytest.skip("not glibc: malloc's settings are not ours to hold")
    pages = 64 * 2**20 // resource.getpagesize()
    here = Path(__file__).resolve()
    code = _FAULTS_PER_CALL.format(module=here.stem)

    def faults_per_call(mode: str) -> float:
        done = subprocess.run([sys.executable, "-c", code, mode], cwd=here.parent, capture_output=True, text=True, timeout=120, check=True)
        return float(done.stdout.split()[-1])

    # The median call over 8: with the memory held, a call still faults the whole block in now and
    # then (1-2 calls in 8 when torch runs on one thread; measured), but not as a rule.
    assert faults_per_call("plain") > 0.9 * pages  # glibc's defaults: every call faults the block in again
    assert faults_per_call("timed") < 0.02 * pages  # held: the block's pages are reused
