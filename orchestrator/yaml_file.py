"""Reading a user's YAML file (config, pipeline, search space) with one-line errors.

Imports nothing heavy, so the CLI can check the file it was given before it imports torch, timm
and the methods: a missing or malformed file is answered in well under a second.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

__all__ = ["read_yaml"]


def read_yaml(path: str | Path, what: str) -> Any:
    """The YAML document in the file at ``path`` (None for an empty file).

    Raises:
        ConfigError: the file does not exist, or is not valid YAML (with the line of the problem);
            ``what`` names the file in the message (``"config file"``, ``"pipeline file"``, ...).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{what} {str(path)!r} is not valid YAML{at}") from None
