"""The contract every registered method keeps, on the tiny ViT (64 patches + CLS, depth 6).

A new method needs an entry in ``TINY``, ``DISABLED`` and ``SPARSE`` (and ``FROZEN`` if its
``param_groups`` leaves backbone parameters out of the optimizer); the tests below say so if it is missing.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import methods
from methods import MethodOutput, count_gflops, get_method, list_methods

IMAGE = (3, 32, 32)
NUM_CLASSES = 10

# Config overrides that fit the 6-block tiny backbone.
TINY = {"dense": {}, "dynamicvit": {"pruning_loc": (1, 3, 5)}, "tome": {"r": 8}, "evovit": {"prune_location": 2}, "spvit": {"pruning_loc": (1, 3, 5)}, "dvt": {}, "svite": {"token_number": 32, "total_steps": 6, "update_frequency": 2}, "s2vite": {"token_number": 32, "total_steps": 6, "update_frequency": 2, "atten_density": 0.67, "other_density": 0.5}}
# Overrides that turn the method's sparsity off: the eval model must then compute plain timm.
DISABLED = {"dense": {}, "dynamicvit": {"pruning_loc": (1, 3, 5), "keep_ratio": 1.0}, "tome": {"r": 0}, "evovit": {"prune_location": 2, "prune_ratio": 1.0, "eval_head": "cls"}, "spvit": {"pruning_loc": (1, 3, 5), "keep_ratios": (1.0, 1.0, 1.0)}, "dvt": {"feature_reuse": False, "relation_reuse": False}, "svite": {"density": 1.0}, "s2vite": {"atten_density": 1.0, "other_density": 1.0}}
# Overrides that make the eval model sparse, for the FLOPs check (dense is the baseline itself). svite's
# weight masks leave the dense-kernel graph's FLOPs unchanged (zeros in dense tensors), so its entry is token-sparse.
SPARSE = {"dense": {}, "dynamicvit": {"pruning_loc": (1, 3, 5), "keep_ratio": 0.7}, "tome": {"r": 8}, "evovit": {"prune_location": 2, "prune_ratio": 0.5}, "spvit": {"pruning_loc": (1, 3, 5)}, "dvt": {"thresholds": (0.0, 0.0)}, "svite": {"token_number": 32}, "s2vite": {"atten_density": 0.67, "other_density": 0.5}}
# Parameter names a method deliberately keeps out of the optimizer.
FROZEN = {"dense": set(), "dynamicvit": {"vit.cls_token", "vit.pos_embed"}, "tome": set(), "evovit": set(), "spvit": {"vit.cls_token", "vit.pos_embed"}, "dvt": set(), "svite": set(), "s2vite": set()}
# Methods that add no parameters of their own (they train the backbone only).
PARAMETER_FREE = {"dense", "tome"}

METHODS = list_methods()


def _overrides(table: dict, name: str) -> dict:
    if name not in table:
        pytest.fail(f"method {name!r} has no entry in this table of tests/methods/test_contract.py; add one")
    return table[name]


def _build(name: str, base: torch.nn.Module, table: dict = TINY):
    method = get_method(name)
    cfg = method.config_cls(**_overrides(table, name))
    return method, cfg, method.build_model(cfg, base)


def _teacher(method, base: torch.nn.Module, x: torch.Tensor) -> MethodOutput | None:
    """The frozen dense model's output, for methods that distill from it."""
    if not method.needs_teacher:
        return None
    dense = get_method("dense").build_model(get_method("dense").config_cls(), copy.deepcopy(base)).eval()
    with torch.no_grad():
        return dense(x)


def _group_params(groups: list[dict]) -> list[torch.nn.Parameter]:
    return [p for g in groups for p in g["params"]]


def _images(rng: torch.Generator, batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, *IMAGE, generator=rng)


def test_registry_lists_the_expected_methods():
    assert {"dense", "dynamicvit"} <= set(METHODS)
    with pytest.raises(methods.UnknownMethodError, match="dense"):
        get_method("no_such_method")


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_output_is_method_output_with_logits(name, mode, tiny_vit, rng):
    _, _, model = _build(name, tiny_vit)
    model.train(mode == "train")
    x = _images(rng, batch=3)
    out = model(x)
    assert isinstance(out, MethodOutput)
    assert out.logits.shape == (3, NUM_CLASSES)
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("name", METHODS)
def test_loss_is_finite_and_gradients_reach_every_optimized_parameter(name, tiny_vit, rng):
    base_params = {id(p) for p in tiny_vit.parameters()}
    method, cfg, model = _build(name, tiny_vit)
    model.train()
    x, y = _images(rng), torch.randint(0, NUM_CLASSES, (4,), generator=rng)
    teacher = _teacher(method, tiny_vit, x)

    loss = method.loss(model(x), y, cfg, F.cross_entropy, teacher=teacher)
    assert loss.total.ndim == 0 and torch.isfinite(loss.total)
    assert all(torch.isfinite(v).all() for v in loss.terms.values())
    loss.total.backward()

    named = dict(model.named_parameters())
    params = _group_params(method.param_groups(model, cfg, lr=1e-3, weight_decay=0.05))
    new = [p for p in params if id(p) not in base_params]
    if name in PARAMETER_FREE:
        assert not new
    else:
        assert new, f"{name} optimizes no parameter of its own"
    for n, p in named.items():
        if any(p is q for q in params):
            assert p.grad is not None, f"no gradient reaches {n}"
            assert torch.isfinite(p.grad).all(), f"non-finite gradient in {n}"
    assert all(p.grad.abs().sum() > 0 for p in new), "a new parameter gets an all-zero gradient"


@pytest.mark.parametrize("name", METHODS)
def test_hooks_run_for_three_steps_and_only_optimized_parameters_move(name, tiny_vit, rng):
    method, cfg, model = _build(name, tiny_vit)
    model.train()
    groups = method.param_groups(model, cfg, lr=1e-3, weight_decay=0.05)
    optimized = {id(p) for p in _group_params(groups)}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(groups)
    hooks = method.hooks(model, cfg)
    for step in range(3):
        x, y = _images(rng), torch.randint(0, NUM_CLASSES, (4,), generator=rng)
        loss = method.loss(model(x), y, cfg, F.cross_entropy, teacher=_teacher(method, tiny_vit, x))
        assert torch.isfinite(loss.total)
        opt.zero_grad(set_to_none=True)
        loss.total.backward()
        hooks.after_backward(step)
        opt.step()
        hooks.after_optimizer_step(step)
    hooks.on_epoch_end(0)

    for n, p in model.named_parameters():
        moved = not torch.equal(p.detach(), before[n])
        assert moved == (id(p) in optimized), f"{n}: moved={moved} but optimized={id(p) in optimized}"


@pytest.mark.parametrize("name", METHODS)
def test_state_dict_round_trip_gives_identical_eval_logits(name, make_tiny_vit, rng):
    _, _, model = _build(name, make_tiny_vit(seed=0))
    _, _, fresh = _build(name, make_tiny_vit(seed=1))
    model.eval(), fresh.eval()
    x = _images(rng)
    with torch.no_grad():
        assert not torch.allclose(model(x).logits, fresh(x).logits)
        fresh.load_state_dict(model.state_dict())  # strict: the same keys on both sides
        assert torch.equal(model(x).logits, fresh(x).logits)


@pytest.mark.parametrize("name", METHODS)
def test_sparsity_disabled_equals_plain_timm(name, tiny_vit, rng):
    plain = copy.deepcopy(tiny_vit).eval()
    _, _, model = _build(name, tiny_vit, DISABLED)
    model.eval()
    x = _images(rng)
    with torch.no_grad():
        expected = plain(x)
        got = model(x).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", METHODS)
def test_eval_gflops_below_the_dense_baseline(name, tiny_vit):
    dense_gflops = count_gflops(copy.deepcopy(tiny_vit), IMAGE)
    _, _, model = _build(name, tiny_vit, SPARSE)
    gflops = count_gflops(model, IMAGE)
    assert math.isfinite(gflops) and gflops > 0
    if name == "dense":
        assert gflops == pytest.approx(dense_gflops, rel=1e-9)
    else:
        assert gflops < dense_gflops
    assert model.training, "count_gflops must restore the training mode"


@pytest.mark.parametrize("name", METHODS)
def test_param_groups_are_disjoint_and_cover_all_but_the_frozen(name, tiny_vit):
    method, cfg, model = _build(name, tiny_vit)
    groups = method.param_groups(model, cfg, lr=1e-3, weight_decay=0.05)
    assert groups and all(g["params"] for g in groups)
    assert all({"lr", "weight_decay"} <= set(g) for g in groups)
    ids = [id(p) for p in _group_params(groups)]
    assert len(ids) == len(set(ids)), "a parameter is in two groups"
    names = {n for n, p in model.named_parameters() if id(p) in set(ids)}
    expected = {n for n, _ in model.named_parameters()} - FROZEN.get(name, set())
    assert names == expected
