"""Latency lookup tables: how long one module takes as a function of its token count, measured here.

Latency-aware methods (SPViT) choose their token schedule from what a transformer block really costs
on the trial's own device. ``BlockLatencyTable.build`` times a module on random ``[B, n, C]`` inputs
for a grid of token counts ``n`` (eval mode, ``no_grad``, ``methods.measure.time_forward``);
``predict(n)`` interpolates linearly between the measured points (exact at them). A table depends on
the device, the module's architecture, the batch size, the dtype, the torch version and the thread
count, and is worth measuring only once: ``load_or_build`` keeps it as one JSON file per key in a
cache folder and later runs read it back.

Cache file: ``<cache_dir>/latency-<name>-<sha256(key)[:16]>.json``::

    {"format": "prunetune.latency/1",
     "key": {...},                       # exactly the key it was built for (checked on load)
     "token_counts": [2, 18, ...],       # measured grid, increasing
     "latency_ms": [0.41, 0.45, ...],    # median ms of one forward at each count
     "warmup": 10, "iters": 30, "created": "2025-01-01T00:00:00+00:00"}
"""
from __future__ import annotations

import bisect
import copy
import datetime
import hashlib
import json
import logging
import os
import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .measure import time_forward

__all__ = ["BlockLatencyTable", "latency_cache_key", "device_name", "token_grid"]

_logger = logging.getLogger(__name__)

FORMAT = "prunetune.latency/1"


def device_name(device: torch.device | str) -> str:
    """A description of ``device`` precise enough to key measurements: model, SMs/memory or CPU count."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        p = torch.cuda.get_device_properties(index)
        return f"cuda:{p.name}:sm{p.major}{p.minor}:{p.multi_processor_count}mp:{p.total_memory // 2**20}MiB"
    if device.type == "cpu":
        model = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        model = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        return f"cpu:{model}:{os.cpu_count()}cpus"
    return str(device)


def _architecture(module: nn.Module) -> list:
    """What decides a module's cost besides the input: its classes, parameter shapes and attention kernel."""
    arch: list[Any] = [type(m).__name__ for m in module.modules()]
    arch += [[n, list(p.shape)] for n, p in module.named_parameters()]
    arch += [[n, bool(m.fused_attn)] for n, m in module.named_modules() if hasattr(m, "fused_attn")]
    return arch


def latency_cache_key(
    name: str,
    module: nn.Module,
    embed_dim: int,
    token_counts: Sequence[int],
    device: torch.device | str,
    batch_size: int = 1,
    amp: bool = False,
) -> dict[str, Any]:
    """The key a table is measured for: what ``module`` is, where and how it runs, and the grid."""
    return {
        "name": name,
        "device": device_name(device),
        "architecture": _architecture(module),
        "embed_dim": int(embed_dim),
        "batch_size": int(batch_size),
        "dtype": _dtype_name(torch.device(device), amp),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "token_counts": [int(n) for n in token_counts],
    }


def _dtype_name(device: torch.device, amp: bool) -> str:
    if not amp:
        return "float32"
    return "autocast-float16" if device.type == "cuda" else "autocast-bfloat16"


def token_grid(low: int, high: int, points: int) -> list[int]:
    """About ``points`` integers evenly spread over ``[low, high]``, both ends included."""
    if high < low:
        raise ValueError(f"token grid: high {high} < low {low}")
    if points < 2 or high == low:
        return sorted({low, high})
    return sorted({round(low + (high - low) * i / (points - 1)) for i in range(points)})


@dataclass(frozen=True)
class BlockLatencyTable:
    """Measured latency (ms) of one module at a grid of token counts; ``predict`` interpolates linearly.

    Attributes:
        token_counts: the measured token counts, strictly increasing.
        latency_ms: median milliseconds of one forward at each count.
        key: what it was measured for (see ``latency_cache_key``); empty for hand-made tables.
    """

    token_counts: tuple[int, ...]
    latency_ms: tuple[float, ...]
    key: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "token_counts", tuple(int(n) for n in self.token_counts))
        object.__setattr__(self, "latency_ms", tuple(float(t) for t in self.latency_ms))
        if not self.token_counts or len(self.token_counts) != len(self.latency_ms):
            raise ValueError("a latency table needs as many latencies as token counts, and at least one")
        if any(b <= a for a, b in zip(self.token_counts, self.token_counts[1:])):
            raise ValueError(f"token_counts must be strictly increasing, got {list(self.token_counts)}")

    def predict(self, tokens: float) -> float:
        """Milliseconds at ``tokens``: linear between the two nearest measured counts (exact at them).

        Raises ``ValueError`` outside the measured range rather than guess.
        """
        counts, ms = self.token_counts, self.latency_ms
        if not counts[0] <= tokens <= counts[-1]:
            raise ValueError(f"{tokens} tokens is outside the measured range [{counts[0]}, {counts[-1]}]")
        i = bisect.bisect_left(counts, tokens)
        if counts[i] == tokens:
            return ms[i]
        a, b = counts[i - 1], counts[i]
        return ms[i - 1] + (tokens - a) / (b - a) * (ms[i] - ms[i - 1])

    # ------------------------------------------------------------------ measuring

    @classmethod
    def build(
        cls,
        block: nn.Module,
        embed_dim: int,
        token_counts: Sequence[int],
        device: torch.device | str,
        batch_size: int = 1,
        warmup: int = 10,
        iters: int = 30,
        amp: bool = False,
        key: dict[str, Any] | None = None,
    ) -> "BlockLatencyTable":
        """Time ``block`` (a copy, in eval mode, on ``device``) on random ``[batch_size, n, embed_dim]`` inputs."""
        device = torch.device(device)
        module = copy.deepcopy(block).to(device).eval()
        counts = sorted({int(n) for n in token_counts})
        if not counts or counts[0] < 1:
            raise ValueError(f"token counts must be >= 1, got {list(token_counts)}")
        gen = torch.Generator().manual_seed(0)
        ms = []
        for n in counts:
            x = torch.randn(batch_size, n, embed_dim, generator=gen).to(device)
            ms.append(time_forward(module, x, warmup, iters, amp) * 1e3)
        _logger.info("latency table on %s (batch %d): %s", device_name(device), batch_size, dict(zip(counts, (round(t, 4) for t in ms))))
        return cls(tuple(counts), tuple(ms), dict(key or {}))

    @classmethod
    def load_or_build(
        cls,
        cache_dir: str | Path | None,
        key: dict[str, Any],
        block: nn.Module,
        embed_dim: int,
        token_counts: Sequence[int],
        device: torch.device | str,
        batch_size: int = 1,
        warmup: int = 10,
        iters: int = 30,
        amp: bool = False,
    ) -> "BlockLatencyTable":
        """The table cached for ``key`` in ``cache_dir`` if there is one, else ``build`` it and cache it.

        ``cache_dir`` None measures without caching. A cached file whose key differs (a hash
        collision) or that cannot be read is measured again and replaced.
        """
        if cache_dir is None:
            return cls.build(block, embed_dim, token_counts, device, batch_size, warmup, iters, amp, key)
        path = cls.cache_path(cache_dir, key)
        if path.is_file():
            try:
                table = cls.load(path)
                if table.key == key:
                    _logger.info("latency table from %s", path)
                    return table
                _logger.warning("latency cache %s was built for another key; measuring again", path)
            except (OSError, ValueError, KeyError, TypeError) as e:
                _logger.warning("unreadable latency cache %s (%s); measuring again", path, e)
        table = cls.build(block, embed_dim, token_counts, device, batch_size, warmup, iters, amp, key)
        table.save(path, warmup=warmup, iters=iters)
        return table

    # ------------------------------------------------------------------ files

    @staticmethod
    def cache_path(cache_dir: str | Path, key: dict[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        name = "".join(c if c.isalnum() or c in "-_" else "_" for c in str(key.get("name", "module")))
        return Path(cache_dir) / f"latency-{name}-{digest}.json"

    def save(self, path: str | Path, **extra: Any) -> None:
        """Write the table as JSON, atomically (concurrent runs never see half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "format": FORMAT, "key": self.key, "token_counts": list(self.token_counts), "latency_ms": list(self.latency_ms),
            **extra, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | Path) -> "BlockLatencyTable":
        data = json.loads(Path(path).read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} file")
        return cls(tuple(data["token_counts"]), tuple(data["latency_ms"]), data["key"])
