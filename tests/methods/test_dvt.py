"""DVT against the invariants of the implementation reference (methods.md section 2).

Expectations are derived independently of ``methods/dvt.py``: exit routing and thresholds by
per-sample loops, grid resizing by explicit nearest/adaptive-pool index formulas, costs by fvcore on
each forced exit, the reference checkpoint layout by writing its key names out by hand.
"""
from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from methods import CheckpointError, Geometry, MeasureConfig, MethodOutput, count_gflops, get_method
from methods.checkpoint import load_method_checkpoint
from methods.dense import DenseViT
from methods.dvt import (
    DVT, Q_GRID, DVTConfig, DVTMethod, _ExitAt, default_grids, find_thresholds, geometric_shares, resize_grid, route,
    strided_embedding,
)

REPO = Path(__file__).resolve().parents[2]
TINY_GEOMETRY = Geometry(depth=6, num_patches=64, grid=(8, 8), embed_dim=96, num_heads=3)
GRIDS = (4, 6, 8)  # the tiny ViT's exits: 32 px, patch 4 -> 8x8 tokens


@pytest.fixture(autouse=True)
def _quiet_tracer():
    with warnings.catch_warnings():  # fvcore's jit trace warns about the data-dependent exit
        warnings.simplefilter("ignore")
        yield


def _images(rng, batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=rng)


def _build(base, **overrides) -> DVT:
    return DVT(base, DVTConfig(**overrides))


def _loader(rng, batches: int = 4, batch: int = 16):
    return [(_images(rng, batch), torch.randint(0, 10, (batch,), generator=rng)) for _ in range(batches)]


def _confidences(model: DVT, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    with torch.no_grad():
        outs = model.forward_all(x)
    return outs, torch.stack([o.softmax(-1).amax(-1) for o in outs])


def _midpoint_thresholds(conf: torch.Tensor) -> torch.Tensor:
    """Thresholds between two observed confidences (no sample sits on one), about a third exiting at each."""
    ts = []
    for k in range(conf.shape[0] - 1):
        c = conf[k].sort(descending=True).values
        j = max(1, c.numel() // 3)
        ts.append(float(c[j - 1] + c[j]) / 2)
    return torch.tensor(ts + [-math.inf])


# ---------------------------------------------------------------- geometry


def test_default_grids_and_strided_embeddings():
    assert default_grids(14) == (7, 10, 14)  # DeiT at 224 px, as the reference
    assert default_grids(8) == GRIDS
    assert strided_embedding(224, 7) == (32, 0)
    assert strided_embedding(224, 10) == (23, 3)  # the reference's Conv(k23, s23, pad3)
    for img, grid in [(224, 7), (224, 10), (224, 14), (32, 4), (32, 6), (32, 8), (384, 17)]:
        s, pad = strided_embedding(img, grid)
        out = F.conv2d(torch.zeros(1, 1, img, img), torch.zeros(1, 1, s, s), stride=s, padding=pad)
        assert out.shape[-2:] == (grid, grid)


def test_sequence_lengths_per_exit(tiny_vit, rng):
    model = _build(tiny_vit)
    seen: dict[int, list[int]] = {}
    handles = [
        vit.blocks[0].norm1.register_forward_pre_hook(lambda m, a, k=k: seen.setdefault(k, []).append(a[0].shape[1]))
        for k, vit in enumerate(model.exits)
    ]
    try:
        model.train()(_images(rng))
        with torch.no_grad():
            model.eval()(_images(rng))  # thresholds +inf: every sample runs every exit
    finally:
        for h in handles:
            h.remove()
    assert seen == {0: [17, 17], 1: [37, 37], 2: [65, 65]}  # 1 + g^2 for g = 4, 6, 8


def test_deit_small_exits_match_the_reference_shapes():
    cfg = DVTConfig()
    cfg.validate_for(Geometry(depth=12, num_patches=196, grid=(14, 14), embed_dim=384, num_heads=6))
    assert [1 + g * g for g in cfg.exit_grids(14)] == [50, 101, 197]


def test_config_is_checked_against_the_backbone():
    with pytest.raises(ValueError, match="strictly increasing"):
        DVTConfig(grids=(6, 4, 8))
    with pytest.raises(ValueError, match="at least 2 exits"):
        DVTConfig(grids=(8,))
    with pytest.raises(ValueError, match="end with the backbone's grid 8"):
        DVTConfig(grids=(4, 7)).validate_for(TINY_GEOMETRY)
    with pytest.raises(ValueError, match="thresholds"):
        DVTConfig(thresholds=(0.5,)).validate_for(TINY_GEOMETRY)  # 3 exits need 2
    with pytest.raises(ValueError, match="square"):
        DVTConfig().validate_for(Geometry(depth=6, num_patches=32, grid=(4, 8), embed_dim=96, num_heads=3))
    with pytest.raises(ValueError, match="budget"):
        DVTConfig(budget=0.0)
    with pytest.raises(ValueError, match="threshold_policy"):
        DVTConfig(threshold_policy="linear")
    with pytest.raises(ValueError, match="derived"):
        DVTConfig().validate_for(Geometry(depth=6, num_patches=4, grid=(2, 2), embed_dim=96, num_heads=3))  # (1, 1, 2)
    DVTConfig(grids=(4, 8), thresholds=(0.9,)).validate_for(TINY_GEOMETRY)


def test_search_space_values_fit_the_tiny_quickstart_backbone():
    space = yaml.safe_load((REPO / "search_spaces" / "dvt.yaml").read_text())
    assert {"budget", "threshold_policy"} <= set(space)
    quick = Geometry(depth=4, num_patches=64, grid=(8, 8), embed_dim=96, num_heads=3)
    for name, spec in space.items():
        if "." in name:
            continue
        assert name in DVTConfig.field_names()
        for value in (spec["low"], spec["high"]) if "low" in spec else spec.get("values", [spec.get("value")]):
            DVTConfig(**{name: value}).validate_for(quick)


# ---------------------------------------------------------------- reuse


def _resize_loop(t: torch.Tensor, g_in: int, g_out: int) -> torch.Tensor:
    """Nearest upsampling to m = g_in * max(2, ceil(g_out / g_in)), then adaptive average pooling, by index formulas."""
    m = g_in * max(2, math.ceil(g_out / g_in))
    src = t.reshape(*t.shape[:-1], g_in, g_in)
    out = torch.zeros(*t.shape[:-1], g_out, g_out, dtype=torch.float64)
    for i in range(g_out):
        rows = range(math.floor(i * m / g_out), math.ceil((i + 1) * m / g_out))
        for j in range(g_out):
            cols = range(math.floor(j * m / g_out), math.ceil((j + 1) * m / g_out))
            acc = sum(src[..., (a * g_in) // m, (b * g_in) // m].double() for a in rows for b in cols)
            out[..., i, j] = acc / (len(rows) * len(cols))
    return out.reshape(*t.shape[:-1], g_out * g_out).to(t.dtype)


@pytest.mark.parametrize("g_in,g_out", [(7, 10), (10, 14), (4, 6), (6, 8)])
def test_grid_resize_is_nearest_then_adaptive_pool(rng, g_in, g_out):
    t = torch.randn(2, 3, g_in * g_in, generator=rng)
    torch.testing.assert_close(resize_grid(t, g_in, g_out), _resize_loop(t, g_in, g_out), atol=1e-6, rtol=1e-6)


def test_reused_relations_and_features(tiny_vit, rng):
    """Per layer (B, H, n+1, n+1), CLS row/column not resized; reused features zero at CLS."""
    model = _build(tiny_vit)
    x = _images(rng, 2)
    with torch.no_grad():
        _, feature, relations = model.run_exit(0, x, None, None)
        assert feature.shape == (2, 17, 96) and relations.shape == (2, 6 * 3, 17, 17)
        biases = model._relation_bias(1, relations)
        r = model.reuse["exit2"].relations(relations)  # the 1x1-conv MLP, before resizing
        f = model._reused_feature(1, 2, feature)
        mlp_out = model.reuse["exit2"].features[2](feature[:, 1:])
    assert len(biases) == 6 and all(b.shape == (2, 3, 37, 37) for b in biases)
    expected = torch.empty(2, 18, 37, 37)
    expected[..., 0, 0] = r[..., 0, 0]
    expected[..., 0, 1:] = _resize_loop(r[..., 0, 1:], 4, 6)  # CLS query over resized keys
    expected[..., 1:, 0] = _resize_loop(r[..., 1:, 0], 4, 6)  # resized queries on the CLS key
    keys = _resize_loop(r[..., 1:, 1:], 4, 6)  # [.., 16 queries, 36 keys]
    expected[..., 1:, 1:] = _resize_loop(keys.transpose(-1, -2), 4, 6).transpose(-1, -2)
    torch.testing.assert_close(torch.cat(biases, dim=1), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(biases, dim=1)[:, 3:6], expected[:, 3:6])  # group l = channels lH..lH+H-1
    assert f.shape == (2, 37, 48) and torch.equal(f[:, 0], torch.zeros(2, 48))
    torch.testing.assert_close(f[:, 1:], _resize_loop(mlp_out.transpose(1, 2), 4, 6).transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_with_both_reuse_paths_off_each_exit_is_a_plain_vit(tiny_vit, rng):
    model = _build(tiny_vit, feature_reuse=False, relation_reuse=False).eval()
    x = _images(rng)
    with torch.no_grad():
        outs = model.forward_all(x)
        for k, vit in enumerate(model.exits):
            torch.testing.assert_close(outs[k], vit(x), atol=0, rtol=0)  # timm's own forward
        torch.testing.assert_close(model(x).logits, tiny_vit.eval()(x), atol=1e-5, rtol=1e-5)  # the last exit is the backbone
    assert not list(model.reuse.parameters())


def test_reuse_paths_carry_the_upstream_exit_into_the_downstream_ones(make_tiny_vit, rng):
    """With a reuse path on, changing exit 1's weights changes exits 2 and 3; with both off it cannot."""
    x = _images(rng)
    plain = None
    for fr, rr in [(False, False), (True, False), (False, True), (True, True)]:
        model = _build(make_tiny_vit(0), feature_reuse=fr, relation_reuse=rr).eval()
        with torch.no_grad():
            before = model.forward_all(x)
            model.exits[0].blocks[0].attn.qkv.weight.mul_(3.0)  # feeds both exit 1's features and its logits
            after = model.forward_all(x)
        assert not torch.equal(before[0], after[0])
        for k in (1, 2):
            assert torch.equal(before[k], after[k]) == (not fr and not rr), (fr, rr, k)
        if plain is None:
            plain = before
        torch.testing.assert_close(before[0], plain[0])  # exit 1 reuses nothing
    # relation reuse whose MLP outputs zero is exactly no relation reuse (explicit logits = SDPA)
    model = _build(make_tiny_vit(0), feature_reuse=False, relation_reuse=True).eval()
    for reuse in model.reuse.values():
        torch.nn.init.zeros_(reuse.relations[2].weight)
        torch.nn.init.zeros_(reuse.relations[2].bias)
    with torch.no_grad():
        zeroed = model.forward_all(x)
    for a, b in zip(zeroed, plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- training


def test_loss_sums_the_exits_and_every_exit_gets_gradients(tiny_vit, rng):
    method = get_method("dvt")
    cfg = DVTConfig()
    model = method.build_model(cfg, tiny_vit).train()
    x, y = _images(rng), torch.randint(0, 10, (4,), generator=rng)
    out = model(x)
    assert isinstance(out, MethodOutput) and len(out.aux["exit_logits"]) == 3
    assert out.logits is out.aux["exit_logits"][-1]
    loss = method.loss(out, y, cfg, F.cross_entropy)
    expected = sum(F.cross_entropy(l, y) for l in out.aux["exit_logits"])
    torch.testing.assert_close(loss.total, expected)
    assert {"exit1_loss", "exit2_loss", "exit3_loss"} <= set(loss.terms)
    loss.total.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # each exit's own loss reaches its own weights (and exit 1's reaches no later exit)
    for k in range(3):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x).aux["exit_logits"][k], y).backward()
        assert model.exits[k].head.weight.grad.abs().sum() > 0
        assert model.exits[k].patch_embed.proj.weight.grad.abs().sum() > 0
        for later in model.exits[k + 1:]:
            assert later.head.weight.grad is None


# ---------------------------------------------------------------- early exit


def test_routing_matches_a_per_sample_computation(tiny_vit, rng):
    model = _build(tiny_vit).eval()
    x = _images(rng, 12)
    outs, conf = _confidences(model, x)
    thresholds = _midpoint_thresholds(conf)
    model.thresholds.copy_(thresholds)
    with torch.no_grad():
        got = model(x)
    for i in range(12):
        k = next(k for k in range(3) if k == 2 or float(conf[k, i]) >= float(thresholds[k]))
        assert int(got.aux["exit"][i]) == k
        torch.testing.assert_close(got.logits[i], outs[k][i], atol=1e-5, rtol=1e-5)
    assert set(got.aux["exit"].tolist()) == {0, 1, 2}  # the thresholds really split the batch


def test_early_exit_batch_equals_each_sample_alone(tiny_vit, rng):
    model = _build(tiny_vit).eval()
    x = _images(rng, 9)
    _, conf = _confidences(model, x)
    model.thresholds.copy_(_midpoint_thresholds(conf))
    with torch.no_grad():
        batch = model(x)
        for i in range(9):
            alone = model(x[i:i + 1])
            assert torch.equal(alone.aux["exit"], batch.aux["exit"][i:i + 1])
            torch.testing.assert_close(alone.logits, batch.logits[i:i + 1], atol=1e-5, rtol=1e-5)


def test_thresholds_bound_cost_and_accuracy(tiny_vit, rng):
    """T = (+inf, +inf, -inf): exit 3's logits and cost; T1 = -inf: exit 1's (methods.md 2(h))."""
    model = _build(tiny_vit).eval()
    x = _images(rng, 6)
    outs, _ = _confidences(model, x)
    costs = [count_gflops(_ExitAt(model, k), (3, 32, 32)) for k in range(3)]
    assert costs[0] < costs[1] < costs[2]
    model.thresholds.copy_(torch.tensor([math.inf, math.inf, -math.inf]))
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out.logits, outs[2], atol=1e-5, rtol=1e-5)
    assert out.aux["exit"].tolist() == [2] * 6
    assert count_gflops(model, (3, 32, 32)) == pytest.approx(costs[2], rel=1e-9)
    model.thresholds.copy_(torch.tensor([-math.inf, math.inf, -math.inf]))
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out.logits, outs[0], atol=0, rtol=0)
    assert count_gflops(model, (3, 32, 32)) == pytest.approx(costs[0], rel=1e-9)


def test_route_and_monotone_cost(rng):
    conf = torch.rand(3, 200, generator=rng)
    costs = [1.0, 3.0, 8.0]
    thresholds = torch.tensor([0.7, 0.4, -math.inf])
    exits = route(conf, thresholds)
    for i in range(200):
        k = next(k for k in range(3) if k == 2 or conf[k, i] >= thresholds[k])
        assert int(exits[i]) == k
    previous = -math.inf
    for t1 in [-math.inf, *conf[0].sort().values.tolist(), math.inf]:  # raising T1 never lowers the expected cost
        exits = route(conf, torch.tensor([t1, 0.4, -math.inf]))
        shares = torch.bincount(exits, minlength=3).double() / 200
        assert shares.sum().item() == pytest.approx(1.0)
        cost = float((shares * torch.tensor(costs, dtype=torch.float64)).sum())
        assert cost >= previous - 1e-12
        previous = cost


def _thresholds_loop(conf: torch.Tensor, shares: list[float]) -> list[float]:
    """The reference's walk (descending confidence, skipping exited samples), with cumulative target counts."""
    k_exits, n = conf.shape
    exited = [False] * n
    out = []
    cumulative = 0.0
    for k in range(k_exits - 1):
        cumulative += shares[k]
        want = math.floor(n * cumulative + 1e-9) - sum(exited)
        t = math.inf
        count = 0
        for i in sorted(range(n), key=lambda i: -float(conf[k, i])):
            if not exited[i]:
                count += 1
                if count == want:
                    t = float(conf[k, i])
                    break
        out.append(t)
        exited = [e or float(conf[k, i]) >= t for i, e in enumerate(exited)]
    return out + [-math.inf]


def test_thresholds_realise_the_geometric_shares_within_one_over_n(rng):
    n = 97
    conf = torch.rand(3, n, generator=rng)
    for q in (0.05, 0.5, 1.0, 1.45, 2.95):
        targets = geometric_shares(q, 3)
        assert targets == pytest.approx([q ** k / (q + q ** 2 + q ** 3) for k in (1, 2, 3)])
        t = find_thresholds(conf, targets)
        assert t.tolist() == pytest.approx(_thresholds_loop(conf, targets))
        realised = torch.bincount(route(conf, t), minlength=3).double() / n
        assert all(abs(r - s) <= 1 / n + 1e-12 for r, s in zip(realised.tolist(), targets)), (q, realised, targets)


# ---------------------------------------------------------------- calibration and measurement


def test_calibrated_thresholds_meet_the_budget_on_the_calibration_split(tiny_vit, rng):
    dense_gflops = count_gflops(copy.deepcopy(tiny_vit), (3, 32, 32))
    method = get_method("dvt")
    cfg = DVTConfig(budget=0.6)
    model = method.build_model(cfg, tiny_vit)
    loader = _loader(rng)
    metrics = method.calibrate(model, cfg, loader, torch.device("cpu"))
    assert model.training, "calibrate must restore the training mode"
    assert bool(model.calibrated) and math.isfinite(float(model.thresholds[0]))
    assert metrics["calib_dense_gflops"] == pytest.approx(dense_gflops, rel=1e-9)
    assert metrics["threshold_1"] == pytest.approx(float(model.thresholds[0]))
    # re-measure independently: the real early-exit pipeline on the same images, fvcore per forced exit
    model.eval()
    costs = [count_gflops(_ExitAt(model, k), (3, 32, 32)) for k in range(3)]
    with torch.no_grad():
        exits = torch.cat([model(x).aux["exit"] for x, _ in loader])
    shares = torch.bincount(exits, minlength=3).double() / exits.numel()
    expected = sum(s * c for s, c in zip(shares.tolist(), costs))
    assert expected <= 0.6 * dense_gflops * (1 + 1e-9)
    assert metrics["calib_expected_gflops"] == pytest.approx(expected, rel=1e-6)
    assert metrics["calib_budget_met"] == 1.0
    assert [metrics[f"calib_exit_share_{k}"] for k in (1, 2, 3)] == pytest.approx(shares.tolist())
    # the table holds every q's thresholds; the one in force is among them
    assert model.threshold_table.shape == (len(Q_GRID), 3)
    assert any(torch.equal(row, model.thresholds) for row in model.threshold_table)
    # a larger budget never picks a cheaper point with worse calibration accuracy
    loose = DVTConfig(budget=3.0)
    metrics_loose = method.calibrate(model, loose, loader, torch.device("cpu"))
    assert metrics_loose["calib_top1"] >= metrics["calib_top1"]


def test_fixed_policy_keeps_the_configured_thresholds(tiny_vit, rng):
    method = get_method("dvt")
    cfg = DVTConfig(threshold_policy="fixed", thresholds=(0.15, 0.12))
    model = method.build_model(cfg, tiny_vit)
    metrics = method.calibrate(model, cfg, _loader(rng, batches=2), torch.device("cpu"))
    assert model.thresholds.tolist() == pytest.approx([0.15, 0.12, -math.inf])
    assert metrics["threshold_1"] == pytest.approx(0.15) and "calib_q" not in metrics
    assert bool(model.calibrated)


def test_measure_reports_the_exit_distribution_and_the_budget_table(tiny_vit, rng):
    method = get_method("dvt")
    cfg = DVTConfig(budget=0.6)
    model = method.build_model(cfg, copy.deepcopy(tiny_vit))
    loader = _loader(rng, batches=3)
    method.calibrate(model, cfg, loader, torch.device("cpu"))
    result = method.measure(
        model, DenseViT(tiny_vit), cfg, loader, (3, 32, 32), torch.device("cpu"), MeasureConfig(warmup=1, iters=2, rounds=1)
    )
    m = result.metrics
    shares = [m[f"exit_share_{k}"] for k in (1, 2, 3)]
    assert sum(shares) == pytest.approx(1.0)
    assert m["gflops"] == pytest.approx(sum(s * m[f"gflops_exit{k + 1}"] for k, s in enumerate(shares)))
    assert m["latency_ms"] == pytest.approx(sum(s * m[f"latency_exit{k + 1}_ms"] for k, s in enumerate(shares)))
    assert m["speedup"] == pytest.approx(m["dense_latency_ms"] / m["latency_ms"])
    assert m["throughput_ratio"] == pytest.approx(m["throughput_ips"] / m["dense_throughput_ips"])
    assert m["gflops_exit1"] < m["dense_gflops"] < m["gflops_exit3"]
    assert m["table_thresholds_from_val"] == 0.0
    rows = result.tables["accuracy_vs_budget"]
    assert len(rows) == len(Q_GRID) and list(rows[0])[:2] == ["gflops", "top1"]
    assert [r["q"] for r in rows] == list(Q_GRID)
    assert all(sum(r[f"exit_share_{k}"] for k in (1, 2, 3)) == pytest.approx(1.0) for r in rows)


# ---------------------------------------------------------------- checkpoints


def test_state_dict_round_trip_keeps_the_thresholds(make_tiny_vit, rng):
    method = get_method("dvt")
    cfg = DVTConfig()
    model = method.build_model(cfg, make_tiny_vit(0))
    method.calibrate(model, cfg, _loader(rng, batches=2), torch.device("cpu"))
    fresh = method.build_model(cfg, make_tiny_vit(1))
    assert not bool(fresh.calibrated) and float(fresh.thresholds[0]) == math.inf
    fresh.load_state_dict(model.state_dict())
    for name in ("thresholds", "threshold_table", "calibrated"):
        assert torch.equal(getattr(fresh, name), getattr(model, name)), name
    x = _images(rng, 8)
    model.eval(), fresh.eval()
    with torch.no_grad():
        a, b = model(x), fresh(x)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.aux["exit"], b.aux["exit"])


def _reference_layout(model: DVT) -> dict[str, torch.Tensor]:
    """The model's weights under the authors' names (DVT_Deit_small's model_state_dict), written out by hand."""
    names = {"exits.0.": "less_less_token.", "exits.1.": "less_token.", "exits.2.": "normal_token."}
    ref = {}
    for key, value in model.state_dict().items():
        if key in ("thresholds", "threshold_table", "calibrated"):
            continue
        if key.startswith("exits."):
            prefix = key[:8]
            ref[names[prefix] + key[8:]] = value
        elif ".features." in key:  # reuse.exit{k}.features.{i}.rest
            _, exit_name, _, i, rest = key.split(".", 4)
            owner = ["less_less_token", "less_token", "normal_token"][int(exit_name[4:]) - 1]
            ref[f"{owner}.blocks.{i}.feature_resuse_mlp.{rest}"] = value
        elif ".relations." in key:
            _, exit_name, _, rest = key.split(".", 3)
            owner = ["less_less_token", "less_token", "normal_token"][int(exit_name[4:]) - 1]
            ref[f"{owner}.relation_reuse_conv.{rest}"] = value
    # the reference also has a feature MLP in the last exit's last block (it never reaches the logits)
    for rest, shape in [("0.weight", (96,)), ("0.bias", (96,)), ("1.fc1.weight", (128, 96)), ("1.fc1.bias", (128,)),
                        ("1.fc2.weight", (48, 128)), ("1.fc2.bias", (48,))]:
        ref[f"normal_token.blocks.5.feature_resuse_mlp.{rest}"] = torch.randn(shape)
    return ref


def test_reference_layout_loads_and_gives_identical_logits(make_tiny_vit, rng, tmp_path):
    method = get_method("dvt")
    cfg = DVTConfig()
    source = method.build_model(cfg, make_tiny_vit(0)).eval()
    ref = _reference_layout(source)
    assert "less_token.relation_reuse_conv.0.weight" in ref and "normal_token.blocks.0.feature_resuse_mlp.1.fc1.weight" in ref
    path = tmp_path / "dvt_deit.pth"
    published = torch.rand(59, 3, generator=torch.Generator().manual_seed(3))
    published[:, -1] = -1e8  # the reference's last threshold
    torch.save({"model_state_dict": {"module." + k: v for k, v in ref.items()}, "flops": torch.tensor([1.0, 2.0, 3.0]),
                "dynamic_threshold": published}, path)
    target = method.build_model(cfg, make_tiny_vit(1))
    assert load_method_checkpoint(method, cfg, target, path, layout="reference") == "reference"
    target.eval()
    x = _images(rng)
    with torch.no_grad():
        assert torch.equal(target(x).logits, source(x).logits)
    # the authors' per-q thresholds become the table (last exit: everyone); the ones in force wait for calibrate
    assert torch.equal(target.threshold_table[:, :2], published[:, :2]) and (target.threshold_table[:, 2] == -math.inf).all()
    assert bool(target.calibrated) and float(target.thresholds[0]) == math.inf
    del ref["less_token.relation_reuse_conv.2.bias"]
    torch.save({"model_state_dict": ref}, path)
    with pytest.raises(CheckpointError, match="relations.2.bias"):
        load_method_checkpoint(method, cfg, method.build_model(cfg, make_tiny_vit(1)), path, layout="reference")


def test_a_distilled_deit_keeps_both_prefix_tokens_out_of_the_resize(make_tiny_vit, rng):
    base = make_tiny_vit(0, name="deit_tiny_distilled_patch16_224")
    model = _build(base)
    x = _images(rng, 3)
    out = model.train()(x)
    assert [l.shape for l in out.aux["exit_logits"]] == [(3, 10)] * 3
    with torch.no_grad():
        _, feature, relations = model.run_exit(0, x, None, None)
        assert feature.shape[1] == 2 + 16 and relations.shape[-1] == 2 + 16
        f = model._reused_feature(1, 0, feature)
        assert f.shape[1] == 2 + 36 and torch.equal(f[:, :2], torch.zeros(3, 2, 48))
        assert model._relation_bias(1, relations)[0].shape == (3, 3, 38, 38)
        assert model.eval()(x).logits.shape == (3, 10)


def test_method_registration():
    method = get_method("dvt")
    assert isinstance(method, DVTMethod)
    assert method.needs_calibration and method.needs_pretrained and not method.needs_teacher
