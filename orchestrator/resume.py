"""What exact resumption needs beyond model and optimizer: a sampler that can start mid-epoch, the
random number generators of every rank, and the check that a checkpoint belongs to this run.

With ``data.loader_workers: 0`` a run stopped after any optimizer step and resumed from that step's
checkpoint retraces the uninterrupted run (same batches, same augmentations, same dropout): the
sampler skips the batches already done, and torch's, numpy's and Python's generators continue from
where they were. With loader workers the batch order is still exact (each worker's seed is derived
from the seed, rank and epoch), but the augmentations of the rest of that one epoch are drawn anew.
No Ray here: ``loop`` uses it on any rank.
"""
from __future__ import annotations

import logging
import random
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from .errors import UserError

__all__ = ["ResumableSampler", "seed_everything", "rng_state", "set_rng_state", "gather_rng_states", "CheckpointMismatchError", "check_identity", "loader_seed"]

_logger = logging.getLogger(__name__)


class CheckpointMismatchError(UserError):
    """A checkpoint of another method or backbone than the run that would resume from it."""


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (also for one rank: a seeded shuffle per epoch) that can start its
    next epoch after the first ``skip`` samples, so a run resumed mid-epoch sees the batches the
    uninterrupted run would have seen next."""

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.skip = 0

    def set_position(self, epoch: int, skip: int) -> None:
        """Next ``__iter__``: epoch ``epoch``'s order, starting after its first ``skip`` samples."""
        self.set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())[self.skip:]
        self.skip = 0  # only the one resumed epoch is partial
        return iter(indices)

    def __len__(self) -> int:
        return self.num_samples - self.skip


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and Python's generators (timm's crops draw from Python's ``random``)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def loader_seed(seed: int, rank: int, epoch: int) -> int:
    """The seed of a rank's train loader generator for one epoch (its workers' seeds derive from it)."""
    return (seed * 1_000_003 + rank * 10_007 + epoch) % (2**63)


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """This process's torch (CPU and, on GPU, CUDA), numpy and Python generator states, as tensors
    and plain numbers (``torch.load(weights_only=True)`` reads them back)."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": {"version": py_version, "internal": torch.tensor(py_internal, dtype=torch.int64), "gauss": py_gauss},
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore what ``rng_state`` captured."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss"]))
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def gather_rng_states(device: torch.device | None = None) -> list[dict[str, Any]]:
    """Every rank's ``rng_state``, indexed by rank (a collective when a process group exists: every rank calls it)."""
    mine = rng_state(device)
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [mine]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def check_identity(state: dict[str, Any], method: str, backbone: str, where: str = "checkpoint") -> None:
    """Refuse a checkpoint written by another method or on another backbone than this run's.

    Raises:
        CheckpointMismatchError: one line naming both.
    """
    theirs_method, theirs_backbone = state.get("method"), state.get("backbone")
    if (theirs_method is not None and theirs_method != method) or (theirs_backbone is not None and theirs_backbone != backbone):
        raise CheckpointMismatchError(
            f"{where} is of method {theirs_method} on backbone {theirs_backbone or '?'}, but this run is method {method} "
            f"on backbone {backbone}: resume only from a checkpoint of the same method and backbone"
        )
