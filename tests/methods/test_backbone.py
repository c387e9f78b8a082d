"""Backbones by timm name, and dense weights from a local checkpoint file."""
from __future__ import annotations

import pytest
import torch

from methods import BackboneConfig, CheckpointError, create_backbone, load_backbone_weights
from methods.dynamicvit import DynamicViT, DynamicViTConfig


def _x(rng: torch.Generator, size: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=rng)


def _assert_same_weights_and_outputs(src, dst, rng, skip=()) -> None:
    own = dst.state_dict()
    for k, v in src.state_dict().items():
        if not k.startswith(skip):
            assert torch.equal(own[k], v), k
    if not skip:
        src.eval(), dst.eval()
        with torch.no_grad():
            x = _x(rng)
            assert torch.equal(src(x), dst(x))


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda sd: {"model": sd}, id="deit-model-key"),
        pytest.param(lambda sd: sd, id="raw"),
        pytest.param(lambda sd: {"state_dict": sd, "epoch": 3}, id="state_dict-key"),
        pytest.param(lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}}, id="ddp-prefix"),
    ],
)
def test_round_trip(make_tiny_vit, rng, tmp_path, wrap):
    src, dst = make_tiny_vit(seed=0), make_tiny_vit(seed=1)
    assert not torch.equal(src.blocks[0].attn.qkv.weight, dst.blocks[0].attn.qkv.weight)
    path = tmp_path / "dense.pth"
    torch.save(wrap(src.state_dict()), path)
    load_backbone_weights(dst, path)
    _assert_same_weights_and_outputs(src, dst, rng)


@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_prunetune_checkpoint_with_vit_prefix_and_predictors(make_tiny_vit, rng, tmp_path, prefix):
    """A DynamicViT state dict (``vit.`` keys plus predictors), optionally from DDP and/or torch.compile."""
    model = DynamicViT(make_tiny_vit(seed=0), DynamicViTConfig(pruning_loc=(1, 3, 5)))
    sd = model.state_dict()
    assert any(k.startswith("predictors.") for k in sd) and all(k.startswith(("vit.", "predictors.")) for k in sd)
    path = tmp_path / "trial.pth"
    torch.save({"model": {prefix + k: v for k, v in sd.items()}, "optimizer": {}}, path)
    dst = make_tiny_vit(seed=1)
    load_backbone_weights(dst, path)
    _assert_same_weights_and_outputs(model.vit, dst, rng)


def test_head_of_another_size_is_dropped(make_tiny_vit, rng, tmp_path):
    src = make_tiny_vit(seed=0, num_classes=1000)
    dst = make_tiny_vit(seed=1)
    head_before = dst.head.weight.detach().clone()
    path = tmp_path / "in1k.pth"
    torch.save({"model": src.state_dict()}, path)
    load_backbone_weights(dst, path)
    _assert_same_weights_and_outputs(src, dst, rng, skip=("head.",))
    assert dst.head.weight.shape == (10, 96)
    assert torch.equal(dst.head.weight, head_before)  # the new head keeps its init


def test_position_embedding_is_resampled_to_another_grid(make_tiny_vit, rng, tmp_path):
    src = make_tiny_vit(seed=0)  # 8x8 grid
    dst = make_tiny_vit(seed=1, img_size=48)  # 12x12 grid
    path = tmp_path / "dense.pth"
    torch.save({"model": src.state_dict()}, path)
    load_backbone_weights(dst, path)
    assert dst.pos_embed.shape == (1, 1 + 144, 96)
    assert torch.equal(dst.pos_embed[:, 0], src.pos_embed[:, 0])  # the CLS position is not resampled
    assert torch.equal(dst.blocks[3].mlp.fc1.weight, src.blocks[3].mlp.fc1.weight)


def test_corrupt_file_raises_checkpoint_error_naming_the_path(tiny_vit, rng, tmp_path):
    path = tmp_path / "corrupt.pth"
    path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=rng).numpy().tobytes())
    with pytest.raises(CheckpointError, match="corrupt.pth"):
        load_backbone_weights(tiny_vit, path)


def test_file_without_a_state_dict_raises(tiny_vit, tmp_path):
    path = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "args": {"lr": 1e-3}}, path)
    with pytest.raises(CheckpointError, match="meta.pth"):
        load_backbone_weights(tiny_vit, path)


def test_other_architecture_raises(make_tiny_vit, tmp_path):
    wide = make_tiny_vit(seed=0, embed_dim=192)
    path = tmp_path / "wide.pth"
    torch.save({"model": wide.state_dict()}, path)
    dst = make_tiny_vit(seed=1)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointError, match="wide.pth"):
        load_backbone_weights(dst, path)
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())  # nothing half-loaded


def test_missing_backbone_tensors_raise(make_tiny_vit, tmp_path):
    sd = make_tiny_vit(seed=0).state_dict()
    del sd["blocks.2.attn.qkv.weight"]
    path = tmp_path / "partial.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="blocks.2.attn.qkv.weight"):
        load_backbone_weights(make_tiny_vit(seed=1), path)


def test_missing_file_raises(tiny_vit, tmp_path):
    path = tmp_path / "nowhere" / "dense.pth"
    with pytest.raises(CheckpointError, match="dense.pth"):
        load_backbone_weights(tiny_vit, path)
    with pytest.raises(CheckpointError):
        load_backbone_weights(tiny_vit, tmp_path)  # a directory is not a checkpoint file


def test_unknown_timm_name_raises_naming_it():
    with pytest.raises(ValueError, match="vit_no_such_model_patch16"):
        create_backbone(BackboneConfig(name="vit_no_such_model_patch16"))


def test_non_vit_timm_model_is_rejected():
    with pytest.raises(ValueError, match="resnet18"):
        create_backbone(BackboneConfig(name="resnet18", num_classes=10))


def test_overrides_reach_timm(tiny_vit):
    assert tiny_vit.patch_embed.num_patches == 64
    assert len(tiny_vit.blocks) == 6 and tiny_vit.embed_dim == 96 and tiny_vit.head.out_features == 10
    assert tiny_vit.blocks[0].attn.num_heads == 3
