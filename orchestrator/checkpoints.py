"""Checkpoint folders that are written atomically, verified on load, and pruned.

A checkpoint is a folder holding ``state.pt`` (the ``loop.checkpoint_state`` dict) and
``manifest.json`` (its sha256, size, epoch and global step). ``write`` saves ``state.pt`` under a
temporary name, fsyncs it, renames it into place, then writes the manifest the same way: the
manifest is the commit mark, so a crash mid-save leaves a folder that ``verify`` rejects, never a
good checkpoint replaced by a broken one. ``latest_good`` walks a run's checkpoint folders newest
first (by global step) and returns the first whose ``state.pt`` matches its manifest, warning about
every truncated or corrupt one it passes over. Folders may live on local disk or under ``s3://``
(through ``storage``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import storage
from .errors import UserError

__all__ = [
    "STATE_FILE", "MANIFEST_FILE", "CheckpointCorruptError", "Found", "write", "sha256_file", "verify", "load",
    "load_file", "load_uri", "latest_good", "candidates", "step_dir_name", "save_step", "prune_steps",
]

_logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
_EPOCH_DIR = re.compile(r"^checkpoint_epoch_(\d+)$")
_STEP_DIR = re.compile(r"^checkpoint_step_(\d+)$")


class CheckpointCorruptError(UserError):
    """A checkpoint whose ``state.pt`` is missing, truncated, or differs from its manifest's sha256."""


@dataclass(frozen=True)
class Found:
    """A verified checkpoint: its folder, its state, and the newer folders skipped as broken."""

    folder: str
    state: dict[str, Any]
    skipped: tuple[tuple[str, str], ...] = ()  # (folder, why)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_write(path: Path, write) -> None:
    """Write ``path`` through a temporary sibling, fsync it, rename it into place, fsync the folder."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write(state: dict[str, Any], folder: str | Path) -> dict[str, Any]:
    """Save ``state`` into the local ``folder`` atomically (``state.pt``, then ``manifest.json``); returns the manifest."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / STATE_FILE
    _fsync_write(target, lambda f: torch.save(state, f))
    manifest = {
        "file": STATE_FILE, "sha256": sha256_file(target), "bytes": target.stat().st_size,
        "epoch": int(state.get("epoch", -1)), "batch": int(state.get("batch", 0)), "step": int(state.get("step", 0)),
        "method": state.get("method"), "backbone": state.get("backbone"),
    }
    _fsync_write(folder / MANIFEST_FILE, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    return manifest


def _read_manifest(folder: str) -> dict[str, Any] | None:
    uri = storage.join(folder, MANIFEST_FILE)
    if not storage.exists(uri):
        return None
    try:
        return json.loads(storage.fetch(uri, cache=False).read_text())
    except (ValueError, OSError):
        return {}


def verify(folder: str) -> tuple[Path, dict[str, Any] | None]:
    """The local path of ``folder``'s verified ``state.pt`` and its manifest (None: a checkpoint
    written before manifests existed, accepted as is).

    Raises:
        CheckpointCorruptError: ``state.pt`` missing, or its size or sha256 differs from the manifest.
    """
    manifest = _read_manifest(folder)
    uri = storage.join(folder, STATE_FILE)
    if manifest == {}:
        raise CheckpointCorruptError(f"checkpoint {folder}: unreadable {MANIFEST_FILE}")
    if not storage.exists(uri):
        raise CheckpointCorruptError(f"checkpoint {folder}: no {STATE_FILE}")
    path = storage.fetch(uri, cache=False)
    if manifest is not None:
        size = path.stat().st_size
        if size != manifest["bytes"]:
            raise CheckpointCorruptError(f"checkpoint {folder}: {STATE_FILE} is {size} bytes, its manifest says {manifest['bytes']} (truncated)")
        digest = sha256_file(path)
        if digest != manifest["sha256"]:
            raise CheckpointCorruptError(f"checkpoint {folder}: {STATE_FILE} sha256 {digest[:12]}... differs from its manifest's {manifest['sha256'][:12]}...")
    return path, manifest


def load_file(path: str | Path) -> dict[str, Any]:
    """``torch.load`` of a checkpoint state on the CPU (weights only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt pickle raises many kinds
        raise CheckpointCorruptError(f"checkpoint file {str(path)!r} is not readable ({type(e).__name__}: {str(e)[:120]})") from None


def load(folder: str) -> dict[str, Any]:
    """The verified state of one checkpoint folder (local or ``s3://``)."""
    path, _ = verify(folder)
    return load_file(path)


def _order_key(name: str) -> tuple[int, int] | None:
    """Sort key of a checkpoint folder name (epoch folders: by epoch; step folders: by global step)."""
    if m := _EPOCH_DIR.match(name):
        return (0, int(m.group(1)))
    if m := _STEP_DIR.match(name):
        return (1, int(m.group(1)))
    return None


def candidates(run_dir: str) -> list[str]:
    """The checkpoint folders of a run, newest first by global step (manifest), epoch folders winning ties."""
    ranked = []
    for name in storage.list_dirs(run_dir):
        if _order_key(name) is None:
            continue
        folder = storage.join(run_dir, name)
        manifest = _read_manifest(folder) or {}
        # A folder without a readable manifest sorts by its name's number (an epoch folder: as its epoch).
        step = int(manifest.get("step", -1))
        ranked.append((step, _order_key(name)[0] == 0, _order_key(name)[1], folder))
    ranked.sort(reverse=True)
    return [r[-1] for r in ranked]


def latest_good(run_dir: str, newest_first: list[str] | None = None) -> Found | None:
    """The newest checkpoint of ``run_dir`` that verifies and loads (None when there is none); each
    newer broken one is logged as a warning and listed in ``Found.skipped``."""
    skipped: list[tuple[str, str]] = []
    for folder in newest_first if newest_first is not None else candidates(run_dir):
        try:
            state = load(folder)
        except CheckpointCorruptError as e:
            _logger.warning("%s; falling back to the previous checkpoint", e)
            skipped.append((folder, str(e)))
            continue
        if skipped:
            _logger.warning("resuming from %s (the newer %s were broken)", folder, [s for s, _ in skipped])
        return Found(folder, state, tuple(skipped))
    if skipped:
        _logger.warning("no good checkpoint under %s: every one was broken", run_dir)
    return None


def step_dir_name(step: int) -> str:
    return f"checkpoint_step_{step:08d}"


def save_step(state: dict[str, Any], run_dir: str) -> str:
    """Write a mid-epoch checkpoint of ``state`` under ``run_dir`` (local or ``s3://``); returns its folder."""
    folder = storage.join(run_dir, step_dir_name(int(state["step"])))
    if not storage.is_s3(run_dir):
        write(state, folder)
        return folder
    with tempfile.TemporaryDirectory() as d:
        write(state, d)
        storage.upload(Path(d) / STATE_FILE, storage.join(folder, STATE_FILE))
        storage.upload(Path(d) / MANIFEST_FILE, storage.join(folder, MANIFEST_FILE))  # last: the commit mark
    return folder


def prune_steps(run_dir: str, keep: int, after_step: int = -1) -> list[str]:
    """Delete mid-epoch checkpoints of ``run_dir`` beyond the newest ``keep``, and every one at or
    before ``after_step`` (an epoch checkpoint supersedes them); returns the folders removed."""
    steps = sorted((int(m.group(1)), name) for name in storage.list_dirs(run_dir) if (m := _STEP_DIR.match(name)))
    doomed = [name for i, (step, name) in enumerate(reversed(steps)) if i >= keep or step <= after_step]
    for name in doomed:
        folder = storage.join(run_dir, name)
        if storage.is_s3(folder):
            storage.remove_prefix(folder)
        else:
            shutil.rmtree(folder, ignore_errors=True)
    return [storage.join(run_dir, n) for n in doomed]


def load_uri(uri: str) -> dict[str, Any]:
    """The state at ``uri``: a checkpoint folder, or a ``state.pt`` file (verified against the
    manifest beside it when there is one), local or ``s3://``."""
    if storage.exists(storage.join(uri, STATE_FILE)):
        return load(uri)
    parent = uri.rsplit("/", 1)[0] if storage.is_s3(uri) else str(Path(uri).parent)
    if Path(uri).name == STATE_FILE and storage.exists(storage.join(parent, MANIFEST_FILE)):
        return load(parent)
    return load_file(storage.fetch(uri))
