"""``spawn_ranks``: run a function on N spawned processes and join them with a deadline.

``torch.multiprocessing.start_processes(join=True)`` waits without limit: a rank stuck in a
collective or a destructor holds pytest until its global timeout and outlives it. Here a rank still
alive at the deadline is killed (by its own pid) and the test fails with a line naming it.

Ranks that wrap a model in DDP must drop it before ``destroy_process_group``: a ``Reducer`` that
outlives its process group destroys the gloo backend itself, joining gloo's threads while holding
the GIL that one of them waits for (a deadlock seen in about one run in two on 2 cores).
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch.multiprocessing as mp

__all__ = ["spawn_ranks"]


def spawn_ranks(fn: Callable, args: tuple, nprocs: int = 2, timeout_s: float = 300.0) -> None:
    """``fn(rank, *args)`` on ``nprocs`` spawned processes; raises if any fails or is alive after ``timeout_s``."""
    context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            stuck = [(rank, p.pid) for rank, p in enumerate(context.processes) if p.is_alive()]
            for rank, _ in stuck:
                context.processes[rank].kill()
                context.processes[rank].join()
            raise TimeoutError(f"ranks (rank, pid) {stuck} still running after {timeout_s:.0f} s; killed")
