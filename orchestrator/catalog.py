"""What ``prunetune methods`` lists: every registered method, its parameters, defaults and searched ranges."""
from __future__ import annotations

import dataclasses
import inspect
import sys
from typing import Any

import yaml

from methods import get_method, list_methods

from .search_space import SHIPPED_DIR

__all__ = ["method_catalog", "describe_distribution"]


def describe_distribution(spec: dict) -> str:
    """``{distribution: uniform, low: 0.5, high: 0.9}`` -> ``uniform [0.5, 0.9]``."""
    dist = spec.get("distribution")
    if dist in ("uniform", "loguniform", "int"):
        return f"{dist} [{spec.get('low')}, {spec.get('high')}]"
    if dist == "choice":
        return f"choice {spec.get('values')}"
    if dist == "fixed":
        return f"fixed {spec.get('value')}"
    return str(spec)


def _shipped_space(name: str) -> dict[str, Any]:
    path = SHIPPED_DIR / f"{name}.yaml"
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    return {str(k).removeprefix("method."): v for k, v in data.items()}


def method_catalog() -> list[dict[str, Any]]:
    """One entry per registered method: flags, a one-line summary, and each config field with its
    default and the range its shipped search space gives it (plus searched keys of other sections)."""
    out = []
    for name in list_methods():
        method = get_method(name)
        space = _shipped_space(name)
        fields = dataclasses.fields(method.config_cls)
        params = []
        for f in fields:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            params.append({
                "name": f.name, "default": list(default) if isinstance(default, tuple) else default,
                "type": str(f.type), "search": describe_distribution(space[f.name]) if f.name in space else "",
            })
        own = {f.name for f in fields}
        doc = inspect.getdoc(sys.modules[type(method).__module__]) or ""
        out.append({
            "name": name, "summary": doc.splitlines()[0] if doc else "",
            "needs_pretrained": method.needs_pretrained, "needs_teacher": method.needs_teacher,
            "parameters": params,
            "searched_elsewhere": [{"name": k, "search": describe_distribution(v)} for k, v in space.items() if k not in own],
        })
    return out
