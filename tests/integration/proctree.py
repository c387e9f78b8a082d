"""The processes a test started, found by their parent ids in /proc (never by a pattern over the machine)."""
from __future__ import annotations

from pathlib import Path

__all__ = ["descendants"]


def descendants(root: int) -> set[int]:
    """Every live process below ``root`` (e.g. the CLI a test started: its local Ray, Ray's workers)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):  # the process ended meanwhile
            continue
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found
