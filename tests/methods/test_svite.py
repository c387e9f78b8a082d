"""SViTE / S2ViTE / SViTE+ against the invariants of the implementation reference (methods.md section 5(h))."""
from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

import methods.svite as svite
from methods import BackboneConfig, Geometry, count_gflops, create_backbone, get_method
from methods.checkpoint import load_method_checkpoint
from methods.svite import S2ViTEConfig, SViTE, SViTEConfig, SViTEHooks
from ranks import spawn_ranks

REPO = Path(__file__).resolve().parents[2]
IMAGE = (3, 32, 32)
#: The quickstart's tiny ViT (4 blocks, 96 channels, 3 heads, 64 patches + CLS).
QUICK = Geometry(depth=4, num_patches=64, grid=(8, 8), embed_dim=96, num_heads=3)
SMALL = BackboneConfig(name="vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2, embed_dim=96, num_heads=3, num_classes=10)


def _build(vit, cfg):
    return get_method("s2vite" if cfg.structured else "svite").build_model(cfg, vit)


def _batch(gen: torch.Generator, n: int = 4):
    return torch.randn(n, *IMAGE, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def _train(model, cfg, steps, gen, optimizer=None, hooks=None, start=0, before_hooks=None):
    """``steps`` AdamW steps driven as the loop drives them; returns (optimizer, hooks)."""
    method = get_method("s2vite" if cfg.structured else "svite")
    if optimizer is None:
        optimizer = torch.optim.AdamW(method.param_groups(model, cfg, lr=1e-2, weight_decay=0.05))
    hooks = hooks or method.hooks(model, cfg, optimizer)
    model.train()
    for step in range(start, start + steps):
        x, y = _batch(gen)
        loss = F.cross_entropy(model(x).logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if before_hooks:
            before_hooks(step)
        hooks.after_backward(step)
        optimizer.step()
        hooks.after_optimizer_step(step)
        yield step, optimizer, hooks


def _run(model, cfg, steps, gen, **kw):
    out = None
    for out in _train(model, cfg, steps, gen, **kw):
        pass
    return out[1], out[2]


# ------------------------------------------------------------------------------------------- ERK


def _erk_brute_force(shapes: dict[str, tuple[int, ...]], density: float) -> dict[str, float]:
    """The one self-consistent ERK solution, found by trying every set of dense layer groups:
    layers with equal raw probability sum(shape)/prod(shape) are one group; the dense ones must exceed
    1 at the solved epsilon and the sparse ones must not."""
    n = {k: math.prod(s) for k, s in shapes.items()}
    raw = {k: sum(s) / n[k] for k, s in shapes.items()}
    groups = sorted(set(raw.values()))
    solutions = []
    for r in range(len(groups)):
        for dense_groups in itertools.combinations(groups, r):
            dense = {k for k in shapes if raw[k] in dense_groups}
            sparse = set(shapes) - dense
            eps = (density * sum(n[k] for k in sparse) - (1 - density) * sum(n[k] for k in dense)) / sum(raw[k] * n[k] for k in sparse)
            if all(eps * raw[k] <= 1 for k in sparse) and all(eps * raw[k] > 1 for k in dense):
                solutions.append({k: 1.0 if k in dense else eps * raw[k] for k in shapes})
    assert len(solutions) == 1
    return solutions[0]


def _expected_nnz(model: SViTE, density: float) -> dict[str, int]:
    shapes = {n: tuple(m.weight.shape) for n, m in model.weight_masks()}
    d = _erk_brute_force(shapes, density)
    return {k: round(d[k] * math.prod(s)) for k, s in shapes.items()}


@pytest.mark.parametrize("density", [0.1, 0.4, 0.8])
def test_erk_init_gives_every_layer_its_exact_erk_count(tiny_vit, density):
    model = _build(tiny_vit, SViTEConfig(density=density))
    names = [n for n, _ in model.weight_masks()]
    assert names == ["patch_embed.proj"] + [f"blocks.{i}.{l}" for i in range(6) for l in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")] + ["head"]
    expected = _expected_nnz(model, density)
    got = {n: int(m.weight_mask.sum()) for n, m in model.weight_masks()}
    assert got == expected
    total = sum(m.weight_mask.numel() for _, m in model.weight_masks())
    assert abs(model.density() - density) < 1e-4  # only rounding to whole weights
    assert sum(got.values()) == pytest.approx(density * total, abs=len(got))
    for _, m in model.weight_masks():  # masked weights are zero from the start; biases are not masked
        assert not m.weight[~m.weight_mask].any()
        assert m.weight_mask.dtype == torch.bool and "weight_mask" in dict(m.named_buffers())
    assert dict(model.named_buffers()).keys() >= {"vit.blocks.0.attn.qkv.weight_mask", "vit.head.weight_mask", "dst_step", "death_rate"}


def test_uniform_init_and_masks_independent_of_the_global_rng(make_tiny_vit):
    a = _build(make_tiny_vit(seed=0), SViTEConfig(density=0.3, sparse_init="uniform"))
    b = _build(make_tiny_vit(seed=1), SViTEConfig(density=0.3, sparse_init="uniform"))
    for (_, ma), (_, mb) in zip(a.weight_masks(), b.weight_masks()):
        assert torch.equal(ma.weight_mask, mb.weight_mask)  # seeded by cfg.seed, not by the backbone's RNG
        assert int(ma.weight_mask.sum()) == round(0.3 * ma.weight_mask.numel())
    c = _build(make_tiny_vit(seed=0), SViTEConfig(density=0.3, sparse_init="uniform", seed=1))
    assert not torch.equal(a.vit.head.weight_mask, c.vit.head.weight_mask)


# ------------------------------------------------------------------------------- unstructured DST


def test_every_update_keeps_layer_counts_and_masked_weights_and_moments_stay_zero(make_tiny_vit):
    cfg = SViTEConfig(density=0.3, update_frequency=1, total_steps=8, t_end=1.0)
    model = _build(make_tiny_vit(depth=2), cfg)
    expected = _expected_nnz(model, 0.3)
    start = {n: m.weight_mask.clone() for n, m in model.weight_masks()}
    for step, opt, _ in _train(model, cfg, 7, torch.Generator().manual_seed(0)):
        for name, layer in model.weight_masks():
            mask = layer.weight_mask
            assert int(mask.sum()) == expected[name], (step, name)
            assert not layer.weight[~mask].any(), f"a pruned weight of {name} is not zero after step {step}"
            state = opt.state[layer.weight]
            assert not state["exp_avg"][~mask].any() and not state["exp_avg_sq"][~mask].any()
    assert any(not torch.equal(start[n], m.weight_mask) for n, m in model.weight_masks()), "no mask ever changed"


def test_an_update_prunes_smallest_magnitudes_grows_largest_gradients_and_resets_moments(make_tiny_vit):
    cfg = SViTEConfig(density=0.3, update_frequency=3, total_steps=10)
    model = _build(make_tiny_vit(depth=2), cfg)
    seen = {}

    def record(step):  # before the hooks: the raw (all-reduced) gradients and the masks
        if step == 2:
            seen["grad"] = {n: m.weight.grad.detach().clone() for n, m in model.weight_masks()}
            seen["mask"] = {n: m.weight_mask.clone() for n, m in model.weight_masks()}

    gen = torch.Generator().manual_seed(1)
    it = _train(model, cfg, 3, gen, before_hooks=record)
    for step, opt, hooks in it:
        if step == 1:
            break
    # step 2 by hand to see the post-step weights before the update
    x, y = _batch(gen)
    loss = F.cross_entropy(model(x).logits, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    record(2)
    hooks.after_backward(2)
    opt.step()
    post = {n: m.weight.detach().clone() for n, m in model.weight_masks()}
    hooks.after_optimizer_step(2)

    dr = 0.005 + (0.5 - 0.005) * (1 + math.cos(math.pi * 3 / 10)) / 2
    assert float(model.death_rate) == pytest.approx(dr, rel=1e-6)
    changed_any = False
    for name, layer in model.weight_masks():
        old = seen["mask"][name].flatten().numpy()
        if old.all():
            assert torch.equal(layer.weight_mask, seen["mask"][name]), "a dense layer changed"
            continue
        nnz = int(old.sum())
        n = math.ceil(dr * nnz)
        idx = np.arange(old.size)
        w = post[name].abs().flatten().numpy()
        g = seen["grad"][name].abs().flatten().numpy()
        act = idx[old]
        drop = act[np.lexsort((act, w[act]))[:n]]  # smallest |w|, ties by position
        survivors = old.copy()
        survivors[drop] = False
        cand = idx[~survivors]
        grow = cand[np.lexsort((cand, -g[cand]))[:n]]  # largest |grad|, ties by position
        expected = survivors.copy()
        expected[grow] = True
        new = layer.weight_mask.flatten().numpy()
        np.testing.assert_array_equal(new, expected, err_msg=name)
        assert int(new.sum()) == nnz
        grown = torch.from_numpy(new & ~old).view_as(layer.weight)
        pruned = torch.from_numpy(old & ~new).view_as(layer.weight)
        changed_any |= bool(grown.any())
        state = opt.state[layer.weight]
        for t in (layer.weight, state["exp_avg"], state["exp_avg_sq"]):
            assert not t[grown].any() and not t[pruned].any()
    assert changed_any


def test_death_rate_follows_the_cosine_and_no_update_after_t_end(make_tiny_vit, monkeypatch):
    calls = []
    original = SViTEHooks._update_weights
    monkeypatch.setattr(SViTEHooks, "_update_weights", lambda self, done, dr: (calls.append((done, dr)), original(self, done, dr)))
    total = 16
    cfg = SViTEConfig(density=0.3, update_frequency=2, total_steps=total, t_end=0.5)
    model = _build(make_tiny_vit(depth=1), cfg)
    rates = [float(model.death_rate) for _ in _train(model, cfg, total, torch.Generator().manual_seed(2))]
    cosine = [0.005 + (0.5 - 0.005) * (1 + math.cos(math.pi * s / total)) / 2 for s in range(1, total + 1)]
    assert rates == pytest.approx(cosine, rel=1e-6)
    assert rates[-1] == pytest.approx(0.005)
    assert [d for d, _ in calls] == [2, 4, 6]  # s % 2 == 0 and s < 0.5 * 16
    assert [r for _, r in calls] == pytest.approx([cosine[d - 1] for d, _ in calls])
    assert int(model.dst_step) == total

    calls.clear()
    cfg = dataclasses.replace(cfg, decay_schedule="constant", t_end=1.0, update_frequency=5)
    model = _build(make_tiny_vit(depth=1), cfg)
    rates = [float(model.death_rate) for _ in _train(model, cfg, 11, torch.Generator().manual_seed(2))]
    assert rates == [0.5] * 11 and [d for d, _ in calls] == [5, 10]


def test_hooks_need_the_total_steps(make_tiny_vit):
    cfg = SViTEConfig(density=0.5)
    model = _build(make_tiny_vit(depth=1), cfg)
    with pytest.raises(ValueError, match="total_steps"):
        _run(model, cfg, 1, torch.Generator().manual_seed(0))
    hooks = get_method("svite").hooks(model, cfg, None, total_steps=5)
    assert hooks.total_steps == 5
    dense = _build(make_tiny_vit(depth=1), SViTEConfig(density=1.0))  # nothing to schedule: no error
    _run(dense, SViTEConfig(density=1.0), 1, torch.Generator().manual_seed(0))


def test_state_dict_round_trip_keeps_masks_and_the_schedule(make_tiny_vit):
    cfg = SViTEConfig(density=0.3, update_frequency=2, total_steps=10, token_number=40)
    a = _build(make_tiny_vit(seed=0, depth=2), cfg)
    opt_a, _ = _run(a, cfg, 3, torch.Generator().manual_seed(3))  # one update (after step 2)
    b = _build(make_tiny_vit(seed=1, depth=2), dataclasses.replace(cfg, seed=7))
    assert any(not torch.equal(x.weight_mask, y.weight_mask) for (_, x), (_, y) in zip(a.weight_masks(), b.weight_masks()))
    b.load_state_dict(copy.deepcopy(a.state_dict()))  # as a checkpoint file would: no shared tensors
    for key in ("dst_step", "death_rate", "gumbel_tau"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    assert int(b.dst_step) == 3 and float(b.gumbel_tau) == pytest.approx(10 + (0.1 - 10) * 0.3)
    opt_b = torch.optim.AdamW(get_method("svite").param_groups(b, cfg, lr=1e-2, weight_decay=0.05))
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    # Both continue from step 3 on the same data: same masks, same weights, bit for bit.
    torch.manual_seed(0)
    _run(a, cfg, 3, torch.Generator().manual_seed(4), optimizer=opt_a, start=3)
    torch.manual_seed(0)
    _run(b, cfg, 3, torch.Generator().manual_seed(4), optimizer=opt_b, start=3)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


# ------------------------------------------------------------------------------------------ DDP


def _mask_state(model: SViTE) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("_mask", "head_mask", "neuron_mask"))}


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {}
        configs = {
            "svite": SViTEConfig(density=0.3, update_frequency=1, total_steps=5, t_end=1.0),
            "s2vite": S2ViTEConfig(atten_density=0.67, other_density=0.5, update_frequency=1, total_steps=5, t_end=1.0),
        }
        for name, cfg in configs.items():
            torch.manual_seed(100 + rank)  # each rank builds its own backbone, as the loop does (seed + rank)
            model = get_method(name).build_model(cfg, create_backbone(SMALL))
            init = _mask_state(model)
            ddp = DistributedDataParallel(model, broadcast_buffers=False)  # no buffer broadcast hides a divergence
            opt = torch.optim.AdamW(get_method(name).param_groups(model, cfg, lr=1e-2, weight_decay=0.05))
            hooks = get_method(name).hooks(model, cfg, opt)
            gen = torch.Generator().manual_seed(1000 + rank)  # different data on each rank
            history = []
            for step in range(4):
                x, y = _batch(gen)
                loss = F.cross_entropy(ddp(x).logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                hooks.after_backward(step)
                opt.step()
                hooks.after_optimizer_step(step)
                history.append(_mask_state(model))
            results[name] = {"init": init, "history": history, "weights": {k: v.clone() for k, v in model.state_dict().items()}}
            del ddp  # before destroy_process_group (see tests/ranks.py)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_masks_agree_across_two_ddp_workers_without_broadcast(tmp_path, port_factory):
    spawn_ranks(_ddp_worker, (2, port_factory(), str(tmp_path)))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for name in ("svite", "s2vite"):
        for key, value in r0[name]["init"].items():
            assert torch.equal(value, r1[name]["init"][key]), f"{name}: initial {key} differs between ranks"
        for step, (m0, m1) in enumerate(zip(r0[name]["history"], r1[name]["history"])):
            for key in m0:
                assert torch.equal(m0[key], m1[key]), f"{name}: {key} differs between ranks after step {step}"
        for key, value in r0[name]["weights"].items():
            torch.testing.assert_close(value, r1[name]["weights"][key], rtol=0, atol=0)
        final = r0[name]["history"][-1]
        assert any(not torch.equal(final[k], r0[name]["init"][k]) for k in final), f"{name}: no mask changed"


# ---------------------------------------------------------------------------------------- S2ViTE


def _unit_invariants(model: SViTE, opt=None) -> None:
    for blk in model.vit.blocks:
        attn, mlp = blk.attn, blk.mlp
        assert int(attn.head_mask.sum()) == model.heads_active and int(mlp.neuron_mask.sum()) == model.neurons_active
        off_h, off_n = ~attn.head_mask, ~mlp.neuron_mask
        assert not attn.proj.weight.view(-1, attn.num_heads, attn.head_dim)[:, off_h].any()
        assert not mlp.fc2.weight[:, off_n].any()
        if opt is not None:  # no optimizer state anywhere in an inactive unit (q/k/v rows, biases, columns)
            for p, sel in svite._head_params(attn, off_h) + svite._neuron_params(mlp, off_n):
                for key in ("exp_avg", "exp_avg_sq"):
                    assert not opt.state[p][key][sel].any()


def test_structured_updates_keep_unit_counts_and_regrown_units_train(make_tiny_vit):
    cfg = S2ViTEConfig(atten_density=0.67, other_density=0.5, update_frequency=2, total_steps=12, t_end=1.0)
    model = _build(make_tiny_vit(depth=2), cfg)
    assert model.heads_active == 2 and model.neurons_active == 192
    _unit_invariants(model)
    start = _mask_state(model)
    grown = {}
    for step, opt, _ in _train(model, cfg, 7, torch.Generator().manual_seed(5)):
        _unit_invariants(model, opt)
        if step == 3:  # an update happened after step 3 (4 steps done): remember what was grown
            prev = history
            grown = {k: v & ~prev[k] for k, v in _mask_state(model).items()}
        history = _mask_state(model)
    assert any(not torch.equal(start[k], history[k]) for k in start)
    # Neurons grown at step 3 (if still active) have trained: their fc2 columns moved off zero.
    for i, blk in enumerate(model.vit.blocks):
        idx = grown[f"vit.blocks.{i}.mlp.neuron_mask"] & blk.mlp.neuron_mask
        if idx.any():
            assert blk.mlp.fc2.weight[:, idx].abs().sum(0).gt(0).all()


def test_structured_export_removes_parameters_and_keeps_the_outputs(make_tiny_vit, rng):
    cfg = S2ViTEConfig(atten_density=0.67, other_density=0.3, update_frequency=1, total_steps=6, t_end=1.0)
    model = _build(make_tiny_vit(depth=3), cfg)
    _run(model, cfg, 3, torch.Generator().manual_seed(6))
    export = get_method("s2vite").inference_model(model, cfg)
    H, D, hidden, C = 3, 32, 384, 96
    h, n = int(H * 0.67), int(hidden * 0.3)  # 2 heads, 115 neurons
    width = 120  # 115 rounded up to a multiple of 8 with zero neurons, for aligned GEMMs
    for blk in export.vit.blocks:
        assert blk.attn.num_heads == h and blk.attn.qkv.weight.shape == (3 * h * D, C) and blk.attn.proj.weight.shape == (C, h * D)
        assert blk.mlp.fc1.weight.shape == (width, C) and blk.mlp.fc2.weight.shape == (C, width)
        assert not blk.mlp.fc1.weight[n:].any() and not blk.mlp.fc1.bias[n:].any() and not blk.mlp.fc2.weight[:, n:].any()
    removed = 3 * ((3 * (H - h) * D) * (C + 1) + C * (H - h) * D + (hidden - width) * (2 * C + 1))
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert params(model) - params(export) == removed
    x = torch.randn(3, *IMAGE, generator=rng)
    with torch.no_grad():
        model.train()  # the masked dense forward (no dropout in the tiny ViT)
        masked = model(x).logits
        model.eval()  # only the active units, sliced
        sliced = model(x).logits
        exported = export.eval()(x).logits
    torch.testing.assert_close(sliced, masked, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(exported, masked, atol=1e-5, rtol=1e-5)
    padding = 3 * 65 * (width - n) * 2 * C / 1e9  # fc1 and fc2 MACs of the zero neurons, 65 tokens, 3 blocks
    assert count_gflops(export, IMAGE) == pytest.approx(count_gflops(model, IMAGE) + padding)
    assert count_gflops(export, IMAGE) < count_gflops(model.vit, IMAGE)


# ----------------------------------------------------------------------------------- token sparsity


def test_token_selector_keeps_exactly_k_tokens_and_the_temperature_falls_linearly(make_tiny_vit, rng):
    cfg = SViTEConfig(density=1.0, token_number=20, total_steps=10)
    model = _build(make_tiny_vit(depth=2), cfg)
    lengths = []
    model.vit.blocks[0].norm1.register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1]))
    x = torch.randn(5, *IMAGE, generator=rng)
    model.train()
    out = model(x)
    keep = out.aux["token_mask"]
    assert keep.shape == (5, 64)
    assert torch.equal((keep > 0.5).sum(1), torch.full((5,), 20))
    assert torch.allclose(keep, keep.round(), atol=1e-6)  # hard 0/1 values (straight-through)
    model.eval()
    model(x)
    assert lengths == [65, 21]  # training keeps the sequence; eval really drops to 20 patches + CLS
    taus = [float(model.gumbel_tau) for _ in _train(model, cfg, 10, torch.Generator().manual_seed(0))]
    assert taus == pytest.approx([10 + (0.1 - 10) * s / 10 for s in range(1, 11)], rel=1e-6)


def _noise_free_topk(scores, k, tau):
    y_soft = (F.log_softmax(scores.float(), dim=-1) / tau).softmax(dim=-1)
    hard = torch.zeros_like(y_soft).scatter_(-1, y_soft.topk(k, dim=-1).indices, 1.0)
    return hard - y_soft.detach() + y_soft


@pytest.mark.parametrize("name", ["svite", "s2vite"])
def test_training_with_hidden_tokens_equals_removing_them_and_zeroing_does_not(name, make_tiny_vit, rng, monkeypatch):
    """With the selection fixed (no Gumbel noise), the training forward (dropped tokens hidden as keys)
    computes what eval computes after really removing them; the reference's zeroing does not."""
    monkeypatch.setattr(svite, "_gumbel_topk", _noise_free_topk)
    x = torch.randn(3, *IMAGE, generator=rng)
    cfg_cls = SViTEConfig if name == "svite" else S2ViTEConfig
    results = {}
    for masking in ("attention", "zero"):
        model = _build(make_tiny_vit(depth=3), cfg_cls(token_number=24, token_masking=masking))
        with torch.no_grad():
            results[masking] = (model.train()(x).logits, model.eval()(x).logits)
    train, evaluated = results["attention"]
    torch.testing.assert_close(train, evaluated, atol=1e-5, rtol=1e-5)
    train, evaluated = results["zero"]
    assert not torch.allclose(train, evaluated, atol=1e-3)


# ------------------------------------------------------------------------------------ measurement


def test_theoretical_gflops_scale_the_masked_layers_by_their_density(tiny_vit):
    dense = count_gflops(copy.deepcopy(tiny_vit), IMAGE)
    model = _build(tiny_vit, SViTEConfig(density=0.3))
    assert count_gflops(model, IMAGE) == pytest.approx(dense)  # dense kernels: zeros cost the same
    rows = {"patch_embed.proj": 64, "head": 1}
    saved = sum(rows.get(n, 65) * m.weight.numel() * (1 - m.weight_mask.float().mean().item()) for n, m in model.weight_masks())
    theoretical = svite.theoretical_gflops(model, IMAGE)
    assert theoretical == pytest.approx(dense - saved / 1e9)
    attention = 6 * 2 * 65 * 65 * 96 / 1e9  # QK^T and AV: not weights, never scaled
    assert attention < theoretical < 0.5 * dense


# ------------------------------------------------------------------------------ reference checkpoints


def _reference_model_dict(model: SViTE) -> dict[str, torch.Tensor]:
    return {k[len("vit."):]: v.clone() for k, v in model.state_dict().items() if k.startswith("vit.") and not k.endswith("_mask")}


def test_unstructured_reference_checkpoint_loads_with_its_masks_and_step(make_tiny_vit, tmp_path, rng):
    cfg = SViTEConfig(density=0.3, update_frequency=2, total_steps=10, token_number=40)
    model = _build(make_tiny_vit(depth=2), cfg)
    _run(model, cfg, 3, torch.Generator().manual_seed(7))
    ref = _reference_model_dict(model)
    ref["gumbel.weight"] = model.selector.score.weight.detach().clone()
    ref["gumbel.bias"] = torch.tensor([0.3])
    # The reference numbers every named parameter of the DDP model (gumbel included) and keeps the >= 2-d ones.
    names = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "gumbel.weight", "gumbel.bias"]
    names += [n for n, _ in model.vit.named_parameters() if n.startswith("blocks.")] + ["norm.weight", "norm.bias", "head.weight", "head.bias"]
    masked = {n + ".weight" for n, _ in model.weight_masks()}
    mask = {f"module.{n}_{i}": model.vit.get_submodule(n[: -len(".weight")]).weight_mask.float() for i, n in enumerate(names) if n in masked}
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": ref, "mask": mask, "other_mask": {}, "atten_mask": {}, "mask_step": 3, "fired_mask": mask,
                "args": argparse.Namespace(density=0.3), "epoch": 0}, path)

    fresh = _build(make_tiny_vit(seed=1, depth=2), dataclasses.replace(cfg, seed=5))
    fresh.load_state_dict(get_method("svite").convert_reference_state(svite.read_reference_checkpoint(path), cfg))
    x = torch.randn(2, *IMAGE, generator=rng)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x).logits, model.eval()(x).logits, rtol=0, atol=0)
    assert _mask_state(fresh).keys() == _mask_state(model).keys()
    assert all(torch.equal(v, _mask_state(model)[k]) for k, v in _mask_state(fresh).items())
    assert int(fresh.dst_step) == 3 and float(fresh.death_rate) == pytest.approx(svite.death_rate_at(cfg, 3, 10))

    # The loader's path: read_state_dict keeps only "model", so the masks are read off the zeros.
    torch.save({"model": ref}, tmp_path / "model_only.pth")
    other = _build(make_tiny_vit(seed=2, depth=2), dataclasses.replace(cfg, seed=9))
    assert load_method_checkpoint(get_method("svite"), cfg, other, tmp_path / "model_only.pth") == "reference"
    assert all(torch.equal(v, _mask_state(model)[k]) for k, v in _mask_state(other).items())


def test_structured_reference_checkpoint_keeps_the_reference_function(make_tiny_vit, tmp_path, rng):
    """The reference masks only qkv rows and fc1 rows / fc2 columns: its pruned heads still emit their v bias
    through an unmasked proj. Conversion folds that constant into proj.bias, so the outputs are unchanged."""
    cfg = S2ViTEConfig(atten_density=0.5, other_density=0.5)
    vit = make_tiny_vit(depth=2, embed_dim=128, num_heads=2)  # DeiT's head dim 64
    model = _build(copy.deepcopy(vit), cfg)
    ref = _reference_model_dict(model)
    atten_mask, other_mask = {}, {}
    g = torch.Generator().manual_seed(0)
    for i, blk in enumerate(model.vit.blocks):
        rows = blk.attn.head_mask.view(1, 2, 1).expand(3, 2, 64).reshape(-1)
        qkv = ref[f"blocks.{i}.attn.qkv.weight"]
        qkv[~rows] = 0  # the reference zeroes the q/k/v rows of pruned heads ...
        ref[f"blocks.{i}.attn.qkv.bias"] = torch.randn(384, generator=g)  # ... but not their biases
        proj = ref[f"blocks.{i}.attn.proj.weight"]
        proj.copy_(torch.randn(proj.shape, generator=g) * 0.05)  # ... nor their proj columns
        ref[f"blocks.{i}.mlp.fc1.weight"][~blk.mlp.neuron_mask] = 0
        atten_mask[f"module.blocks.{i}.attn.qkv.weight_mask"] = rows[:, None].expand(384, 128).float()
        other_mask[f"module.blocks.{i}.mlp.fc1.weight_mask"] = blk.mlp.neuron_mask[:, None].expand(512, 128).float()
        other_mask[f"module.blocks.{i}.mlp.fc2.weight_mask"] = blk.mlp.neuron_mask[None, :].expand(128, 512).float()
    reference = copy.deepcopy(vit).eval()
    reference.load_state_dict(ref)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": ref, "mask": {}, "other_mask": other_mask, "atten_mask": atten_mask, "mask_step": 30, "args": argparse.Namespace()}, path)
    state = svite.read_reference_checkpoint(path)
    fresh = _build(make_tiny_vit(seed=3, depth=2, embed_dim=128, num_heads=2), dataclasses.replace(cfg, seed=4))
    fresh.load_state_dict(get_method("s2vite").convert_reference_state(state, cfg))
    x = torch.randn(2, *IMAGE, generator=rng)
    with torch.no_grad():
        expected = reference(x)
        torch.testing.assert_close(fresh.eval()(x).logits, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(get_method("s2vite").inference_model(fresh, cfg)(x).logits, expected, atol=1e-5, rtol=1e-5)
    for blk, ref_blk in zip(fresh.vit.blocks, model.vit.blocks):
        assert torch.equal(blk.attn.head_mask, ref_blk.attn.head_mask) and torch.equal(blk.mlp.neuron_mask, ref_blk.mlp.neuron_mask)
    assert int(fresh.dst_step) == 30
    with pytest.raises(Exception, match="heads"):  # a config that keeps another number of heads is refused
        get_method("s2vite").convert_reference_state(state, dataclasses.replace(cfg, atten_density=1.0))


# ------------------------------------------------------------------------------------------ config


def test_config_checks_and_geometry():
    for bad in ({"density": 0.0}, {"density": 1.5}, {"update_frequency": 0}, {"death_rate": 1.2}, {"t_end": 2.0},
                {"growth": "momentum"}, {"decay_schedule": "linear"}, {"token_number": -1}, {"tau_end": 0.0}, {"death": "SET"}):
        with pytest.raises(ValueError):
            SViTEConfig(**bad)
    with pytest.raises(ValueError):
        S2ViTEConfig(other_density=0.0)
    with pytest.raises(ValueError, match="token_number"):
        SViTEConfig(token_number=65).validate_for(QUICK)
    with pytest.raises(ValueError, match="atten_density"):
        S2ViTEConfig(atten_density=0.3).validate_for(QUICK)  # int(3 * 0.3) = 0 heads
    assert not get_method("svite").needs_pretrained and not get_method("s2vite").needs_pretrained
    assert get_method("s2vite").config_cls().structured and not get_method("svite").config_cls().structured


@pytest.mark.parametrize("name,cls", [("svite", SViTEConfig), ("s2vite", S2ViTEConfig)])
def test_search_space_values_fit_the_tiny_quickstart_backbone(name, cls):
    space = yaml.safe_load((REPO / "search_spaces" / f"{name}.yaml").read_text())
    assert {"update_frequency", "death_rate", "decay_schedule", "t_end", "growth", "token_number", "train.lr"} <= set(space)
    assert ({"density", "death"} if name == "svite" else {"atten_density", "other_density"}) <= set(space)
    for key, spec in space.items():
        if "." in key:
            continue
        assert key in cls.field_names()
        values = [spec["low"], spec["low"] + (spec["high"] - spec["low"]) / math.pi, spec["high"]] if "low" in spec else spec.get("values", [spec.get("value")])
        for value in values:
            cls(**{key: value}).validate_for(QUICK)
