"""``loop.ddp_options``: what a method declares about DDP reaches DDP, on two real gloo ranks, without
torch 2.13's deprecation warning on every rank.

A buffer set to a different value on each rank after wrapping shows whether DDP re-broadcasts
buffers from rank 0 at every forward (dense: it must) or leaves them to the ranks (SViTE computes
its masks identically on every rank, so it declares ``broadcast_buffers = False``).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from ports import free_port
from ranks import spawn_ranks
from torch import nn

from methods import get_method


class _WithBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.register_buffer("mark", torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + self.mark


def _rank(rank: int, port: int, folder: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from orchestrator.loop import ddp_options

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        out = {}
        for name in ("dense", "svite"):
            model = _WithBuffer()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ddp = DistributedDataParallel(model, **ddp_options(get_method(name)))
            model.mark.fill_(10.0 + rank)  # rank-local from here on
            ddp(torch.ones(1, 2)).sum().backward()
            out[name] = {"mark": model.mark.item(), "warnings": [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]}
            del ddp  # before destroy_process_group (see ranks.py)
        Path(folder, f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


def test_buffers_follow_the_methods_declaration_without_warnings(tmp_path):
    spawn_ranks(_rank, (free_port(), str(tmp_path)), timeout_s=120)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, out in enumerate(ranks):
        assert out["dense"]["mark"] == 10.0, "dense: rank 0's buffer is broadcast at every forward"
        assert out["svite"]["mark"] == 10.0 + r, "SViTE: each rank keeps its own buffers"
        assert out["dense"]["warnings"] == [] and out["svite"]["warnings"] == []
