"""``methods`` stays a leaf: torch, timm and fvcore only, importable in a fresh process."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = ("ray", "mlflow", "boto3", "orchestrator")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_import_methods_pulls_in_no_platform_package():
    code = (
        "import json, sys\n"
        "import methods\n"
        f"print(json.dumps(sorted(m for m in {list(FORBIDDEN)!r} if m in sys.modules)))\n"
    )
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_timm_and_torchvision_import_after_methods_in_a_fresh_process():
    code = (
        "import methods\n"
        "import timm, torchvision\n"
        "from timm.models.vision_transformer import VisionTransformer\n"
        "m = timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=32, patch_size=8, depth=1)\n"
        "assert isinstance(m, VisionTransformer)\n"
        "print('ok', torchvision.__version__)\n"
    )
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok ")


@pytest.mark.parametrize("forbidden", FORBIDDEN)
def test_no_module_in_methods_imports_a_platform_package(forbidden):
    """A static check too, so a lazy import inside a function is caught as well."""
    for path in (REPO / "methods").rglob("*.py"):
        for line in path.read_text().splitlines():
            words = line.strip().replace(",", " ").split()
            if words[:1] in (["import"], ["from"]) and len(words) > 1:
                assert words[1].split(".")[0] != forbidden, f"{path.relative_to(REPO)}: {line.strip()}"
