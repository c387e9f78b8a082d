"""Load a whole method model from a checkpoint: prunetune's own, or a published one in its authors' layout.

A published checkpoint (DynamicViT's or Evo-ViT's model zoo, a DeiT release for ToMe) is mapped onto
prunetune's parameter names by the method's explicit key map (``SparsityMethod.convert_reference_state``);
the result must then name exactly the model's tensors with the model's shapes, or the checkpoint is
refused with the keys that differ. Nothing is loaded partially.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from .backbone import CheckpointError, unwrap_state_dict
from .base import MethodConfig, SparsityMethod

__all__ = ["load_method_checkpoint", "read_state_dict", "key_difference"]

_logger = logging.getLogger(__name__)

Layout = Literal["auto", "prunetune", "reference"]
_WRAPPERS = ("module.", "_orig_mod.")  # DDP and torch.compile


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of the checkpoint file at ``path`` (under ``model``/``state_dict``/... if nested),
    with DDP and ``torch.compile`` prefixes removed and every other key kept as written."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many kinds on a corrupt file
        raise CheckpointError(f"checkpoint {str(path)!r} is not a readable torch file ({type(e).__name__})") from None
    try:
        return unwrap_state_dict(obj, prefixes=_WRAPPERS)
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint {str(path)!r}: {e}") from None


def key_difference(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], limit: int = 4) -> str:
    """'' when ``state`` names exactly ``own``'s tensors with the same shapes, else what differs (one line)."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing, e.g. {missing[:limit]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[:limit]}")
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} of another shape, e.g. {k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}")
    return "; ".join(parts)


def load_method_checkpoint(
    method: SparsityMethod, cfg: MethodConfig, model: nn.Module, path: str | Path, layout: Layout = "auto",
) -> Literal["prunetune", "reference"]:
    """Load ``path`` into ``model`` (built by ``method.build_model(cfg, ...)``); returns the layout it had.

    ``prunetune``: the model's own ``state_dict`` keys (a trial's checkpoint). ``reference``: the
    method's published layout, through its key map. ``auto`` tries the first, then the second.

    Raises:
        CheckpointError: unreadable, or the keys/shapes differ from the model's (listed in the message).
    """
    own = model.state_dict()
    problems = {}
    if layout in ("auto", "prunetune"):
        try:
            state = read_state_dict(path)
        except CheckpointError as e:
            if layout == "prunetune":
                raise
            problems["prunetune"] = str(e)
        else:
            problems["prunetune"] = key_difference(state, own)
            if not problems["prunetune"]:
                model.load_state_dict(state)
                return "prunetune"
    if layout in ("auto", "reference"):
        try:
            raw = method.read_reference_state(Path(path))  # the authors' own file format, where it needs one
            converted = method.convert_reference_state(raw if raw is not None else read_state_dict(path), cfg)
        except NotImplementedError as e:
            problems["reference"] = str(e)
        else:
            problems["reference"] = key_difference(converted, own)
            if not problems["reference"]:
                model.load_state_dict(converted)
                _logger.info("loaded %s's published layout from %s (%d tensors)", method.name, path, len(converted))
                return "reference"
    detail = " | ".join(f"as {k} layout: {v}" for k, v in problems.items())
    raise CheckpointError(f"checkpoint {str(path)!r} does not match the {method.name} model: {detail}")
