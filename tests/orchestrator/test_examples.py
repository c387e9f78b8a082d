"""Every shipped example config parses, validates, and its search space fits it."""
from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config import load_experiment
from orchestrator.search_space import load_sweep_space

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "cluster" / "examples").glob("*.yaml"))


def test_there_are_examples():
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_config_is_valid(path):
    exp = load_experiment(path)
    space = load_sweep_space(exp, base=path.parent)
    assert space.names() and all(arm.space.names() for arm in space.arms)
    assert Path(exp.data.path).is_absolute()
    assert exp.storage_path.startswith("s3://") or Path(exp.storage_path).is_absolute()
