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
}


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
    assert all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in result.values()), result
    assert result["speedup"] == pytest.approx(result["dense_latency_ms"] / result["latency_ms"])
    assert result["throughput_ratio"] == pytest.approx(result["throughput_ips"] / result["dense_throughput_ips"])
    assert result["gflops"] < result["dense_gflops"]
    assert result["dense_gflops"] == pytest.approx(count_gflops(dense, IMAGE))


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
