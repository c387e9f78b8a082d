"""Whole-model checkpoints: prunetune's own layout, the authors' published layouts, and refusals."""
from __future__ import annotations

import pytest
import torch

from methods import CheckpointError, get_method
from methods.checkpoint import load_method_checkpoint


def _model(name: str, vit, **cfg):
    method = get_method(name)
    config = method.config_cls(**cfg)
    return method, config, method.build_model(config, vit).eval()


def _dynamicvit_release(model) -> dict:
    """A state dict laid out as DynamicViT's model zoo stores it (written from the spec, methods.md 1(g).7):
    DeiT keys at the top level and the predictors under ``score_predictor.{k}``, inside ``{"model": ...}``."""
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("vit."):
            out[key[len("vit."):]] = value.clone()
        else:
            assert key.startswith("predictors.")
            out["score_predictor." + key[len("predictors."):]] = value.clone()
    assert any(k.startswith("score_predictor.2.out_conv.4") for k in out) and "blocks.0.attn.qkv.weight" in out
    return {"model": out, "epoch": 29}


def test_dynamicvit_release_layout_loads_and_gives_identical_logits(make_tiny_vit, rng, tmp_path):
    _, _, source = _model("dynamicvit", make_tiny_vit(seed=0), pruning_loc=(1, 3, 5))
    method, cfg, target = _model("dynamicvit", make_tiny_vit(seed=1), pruning_loc=(1, 3, 5))
    path = tmp_path / "dynamicvit_release.pth"
    torch.save(_dynamicvit_release(source), path)
    assert load_method_checkpoint(method, cfg, target, path) == "reference"
    x = torch.randn(2, 3, 32, 32, generator=rng)
    with torch.no_grad():
        assert torch.equal(source(x).logits, target(x).logits)


def test_prunetune_layout_loads_as_is(make_tiny_vit, tmp_path):
    _, _, source = _model("dynamicvit", make_tiny_vit(seed=0), pruning_loc=(1, 3, 5))
    method, cfg, target = _model("dynamicvit", make_tiny_vit(seed=1), pruning_loc=(1, 3, 5))
    torch.save({"model": {"module." + k: v for k, v in source.state_dict().items()}}, tmp_path / "trial.pt")  # DDP-saved
    assert load_method_checkpoint(method, cfg, target, tmp_path / "trial.pt") == "prunetune"
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))


def test_a_checkpoint_that_does_not_match_is_refused_with_the_keys_that_differ(make_tiny_vit, tmp_path):
    _, _, source = _model("dynamicvit", make_tiny_vit(seed=0), pruning_loc=(1, 3, 5))
    release = _dynamicvit_release(source)["model"]
    del release["score_predictor.1.in_conv.1.weight"]
    release["score_predictor.9.extra"] = torch.zeros(3)
    torch.save(release, tmp_path / "bad.pth")
    method, cfg, target = _model("dynamicvit", make_tiny_vit(seed=1), pruning_loc=(1, 3, 5))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_method_checkpoint(method, cfg, target, tmp_path / "bad.pth")
    msg = str(err.value)
    assert "predictors.1.in_conv.1.weight" in msg and "predictors.9.extra" in msg and "\n" not in msg
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # nothing loaded partially


def test_wrong_shapes_are_refused(make_tiny_vit, tmp_path):
    _, _, source = _model("dynamicvit", make_tiny_vit(seed=0, num_classes=5), pruning_loc=(1, 3, 5))
    torch.save(_dynamicvit_release(source), tmp_path / "other_head.pth")
    method, cfg, target = _model("dynamicvit", make_tiny_vit(seed=1), pruning_loc=(1, 3, 5))
    with pytest.raises(CheckpointError, match=r"2 of another shape, e.g. vit\.head\.bias \(5,\) vs \(10,\)"):
        load_method_checkpoint(method, cfg, target, tmp_path / "other_head.pth", layout="reference")


def test_a_deit_release_loads_under_tome(make_tiny_vit, rng, tmp_path):
    """ToMe has no weights of its own: a plain DeiT/timm release is its published layout."""
    vit = make_tiny_vit(seed=0)
    torch.save({"model": vit.state_dict()}, tmp_path / "deit.pth")
    method, cfg, target = _model("tome", make_tiny_vit(seed=1), r=0)
    assert load_method_checkpoint(method, cfg, target, tmp_path / "deit.pth") == "reference"
    x = torch.randn(2, 3, 32, 32, generator=rng)
    with torch.no_grad():
        torch.testing.assert_close(target(x).logits, vit.eval()(x), atol=1e-5, rtol=1e-5)


def test_unreadable_file_is_refused(tmp_path, make_tiny_vit):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    method, cfg, target = _model("dense", make_tiny_vit())
    with pytest.raises(CheckpointError, match="not a readable torch file"):
        load_method_checkpoint(method, cfg, target, tmp_path / "junk.pt")
