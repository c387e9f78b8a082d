"""timm ViT/DeiT backbones by name, with size overrides, and weights from a local checkpoint file.

Weights never come from a hub: ``load_backbone_weights`` reads a file the caller has on disk
(the orchestrator copies ``s3://`` objects down first). Accepted layouts: a plain timm/DeiT state
dict, one under ``"model"``, ``"state_dict"`` or ``"model_state_dict"`` (the DeiT, DynamicViT and
DVT release formats), and prunetune's own checkpoints (keys under ``vit.``, DDP's ``module.``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

__all__ = ["BackboneConfig", "create_backbone", "load_backbone_weights", "CheckpointError", "unwrap_state_dict"]

_logger = logging.getLogger(__name__)

_STATE_KEYS = ("model", "state_dict", "model_state_dict", "module")
_PREFIXES = ("module.", "vit.", "_orig_mod.")
_HEAD_PREFIXES = ("head.", "head_dist.")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the backbone."""


@dataclass(frozen=True)
class BackboneConfig:
    """A timm ViT by name, with optional architecture overrides (None keeps timm's value).

    Attributes:
        name: a timm model name, e.g. ``deit_small_patch16_224`` or ``vit_tiny_patch16_224``.
        pretrained: a local path or ``s3://`` URI of dense weights; None trains a dense model first.
    """

    name: str = "deit_small_patch16_224"
    img_size: int | None = None
    patch_size: int | None = None
    depth: int | None = None
    embed_dim: int | None = None
    num_heads: int | None = None
    num_classes: int | None = None
    drop_path_rate: float = 0.0
    pretrained: str | None = None

    def timm_kwargs(self) -> dict[str, Any]:
        skip = {"name", "pretrained"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip and getattr(self, f.name) is not None}


def create_backbone(cfg: BackboneConfig) -> VisionTransformer:
    """Build ``cfg.name`` from timm with random weights and the overrides; it must be a VisionTransformer."""
    if not timm.is_model(timm.models.split_model_name_tag(cfg.name)[0]):
        raise ValueError(f"unknown timm model {cfg.name!r}")
    model = timm.create_model(cfg.name, pretrained=False, **cfg.timm_kwargs())
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"timm model {cfg.name!r} is a {type(model).__name__}, not a VisionTransformer")
    prefix = 2 if getattr(model, "dist_token", None) is not None else 1  # DeiT's distillation token
    if model.global_pool != "token" or model.num_prefix_tokens != prefix:
        raise NotImplementedError(
            f"{cfg.name!r}: only CLS-token ViTs (global_pool='token'; CLS, plus DeiT's distillation token) "
            f"are supported, got global_pool={model.global_pool!r}, num_prefix_tokens={model.num_prefix_tokens}"
        )
    return model


def unwrap_state_dict(obj: Any, prefixes: tuple[str, ...] = _PREFIXES) -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint object, with ``prefixes`` (DDP/compile/method wrappers) removed."""
    while isinstance(obj, dict):
        inner = next((obj[k] for k in _STATE_KEYS if k in obj and isinstance(obj[k], dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError("no state dict of tensors found in it")
    out = {}
    for key, value in obj.items():
        while key.startswith(prefixes):  # in any order: DDP/compile wrap each other (module._orig_mod.vit.)
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def load_backbone_weights(model: VisionTransformer, path: str | Path) -> None:
    """Load dense weights from the local file ``path`` into ``model``.

    The position embedding is resampled when the grid differs (timm's ``checkpoint_filter_fn``),
    a classifier head of another size is dropped (the new head keeps its init), and keys the
    backbone does not have (a method's predictors) are ignored. Anything else missing is an error.

    Raises:
        CheckpointError: unreadable file, no state dict inside, or weights that do not fit.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        state = unwrap_state_dict(raw)
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint {str(path)!r}: {e}") from None
    except Exception as e:  # torch.load raises many kinds on a corrupt file
        raise CheckpointError(f"checkpoint {str(path)!r} is not a readable torch file ({type(e).__name__})") from None

    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own}
    try:
        state = checkpoint_filter_fn(state, model)
    except Exception as e:
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit {type(model).__name__}: {e}") from None
    for key in list(state):
        if key.startswith(_HEAD_PREFIXES) and state[key].shape != own[key].shape:
            del state[key]
    bad = [k for k, v in state.items() if v.shape != own[k].shape]
    if bad:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not fit the backbone: {len(bad)} tensors of another shape, "
            f"e.g. {bad[0]} {tuple(state[bad[0]].shape)} vs {tuple(own[bad[0]].shape)}"
        )
    missing = [k for k in own if k not in state and not k.startswith(_HEAD_PREFIXES)]
    if missing:
        raise CheckpointError(
            f"checkpoint {str(path)!r} lacks {len(missing)} backbone tensors, e.g. {missing[:3]}"
        )
    model.load_state_dict(state, strict=False)
    _logger.info("loaded %d tensors from %s", len(state), path)
