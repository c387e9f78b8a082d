"""``prunetune eval``: one model from a checkpoint (prunetune's or the authors' layout) on an image folder."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from methods import BackboneConfig, create_backbone, get_method

MODEL = BackboneConfig(name="vit_tiny_patch16_224", img_size=32, patch_size=4, depth=4, embed_dim=96, num_heads=3, num_classes=10)
SETS = ["model.img_size=32", "model.patch_size=4", "model.depth=4", "model.embed_dim=96", "model.num_heads=3",
        "pruning_loc=[1, 2, 3]", "measure.batch_size=8", "measure.warmup=1", "measure.iters=2", "measure.rounds=1"]


def _always_class(c: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """DynamicViT whose head ignores its input and always says class ``c``, in the authors' release layout."""
    torch.manual_seed(seed)
    method = get_method("dynamicvit")
    model = method.build_model(method.config_cls(pruning_loc=(1, 2, 3)), create_backbone(MODEL))
    with torch.no_grad():
        model.vit.head.weight.zero_()
        model.vit.head.bias.copy_(torch.nn.functional.one_hot(torch.tensor(c), 10).float() * 10)
    return {("score_predictor." + k[len("predictors."):]) if k.startswith("predictors.") else k[len("vit."):]: v
            for k, v in model.state_dict().items()}


def _eval(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "orchestrator.cli", "eval", "--method", "dynamicvit", "--backbone", "vit_tiny_patch16_224", *args]
    for s in SETS:
        cmd += ["--set", s]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_eval_of_a_published_layout_reports_accuracy_and_speed(digits_root, tmp_path):
    torch.save({"model": _always_class(3)}, tmp_path / "release.pth")
    proc = _eval("--checkpoint", str(tmp_path / "release.pth"), "--data", str(digits_root), "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    val = digits_root / "val"
    share = len(list((val / "3").iterdir())) / sum(len(list(d.iterdir())) for d in val.iterdir())
    assert out["checkpoint_layout"] == "reference"
    assert out["metrics"]["val_top1"] == pytest.approx(100 * share)  # it always answers 3
    m = out["metrics"]
    assert m["gflops"] < m["dense_gflops"] and m["latency_ms"] > 0 and m["dense_throughput_ips"] > 0
    assert m["speedup"] > 0 and m["throughput_ratio"] > 0  # medians of cycle-by-cycle ratios (tests/methods/test_measure.py)


def test_eval_refuses_a_mismatched_checkpoint_in_one_line(digits_root, tmp_path):
    state = _always_class(3)
    state.pop("score_predictor.0.out_conv.4.weight")
    torch.save(state, tmp_path / "broken.pth")
    proc = _eval("--checkpoint", str(tmp_path / "broken.pth"), "--data", str(digits_root), cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prunetune: error: ")
    assert "predictors.0.out_conv.4.weight" in lines[0] and proc.stdout == ""
