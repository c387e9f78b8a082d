"""``orchestrator.report``: the HTML report on hand-made rows, rendered in a real headless Chromium."""
from __future__ import annotations

import io
import logging

import numpy as np
from PIL import Image

from orchestrator.fronts import Selection, SweepInfo, compare
from orchestrator.report import TokenGrid, _patch_png, build_html, log_sweep_report, run_url, write_report

URI = "http://127.0.0.1:5999"
OBJECTIVES = [("val_top1", "max"), ("latency_ms", "min")]


def _row(i: int, method: str, acc: float | None, lat: float | None, status: str = "FINISHED", role: str = "trial") -> dict:
    return {
        "run_id": f"{i:02d}" + "ab" * 15, "run_name": f"trial_{i}", "status": status, "method": method, "role": role,
        "params": {"keep_ratio": 0.5 + i / 20} if method == "dynamicvit" else {"r": i},
        "metrics": {} if acc is None else {"val_top1": acc, "latency_ms": lat},
        "experiment": "exp", "experiment_id": "7", "sweep": "sw", "sweep_run_id": "parent", "backbone": "tiny", "device": "cpu",
    }


# (accuracy, latency): C is dominated by B (less accurate and slower); F failed (no metrics).
ROWS = [
    _row(0, "dynamicvit", 80.0, 2.0),  # A
    _row(1, "dynamicvit", 70.0, 1.5),  # B
    _row(2, "dynamicvit", 60.0, 1.8),  # C
    _row(3, "tome", 75.0, 1.6),  # D
    _row(4, "tome", 50.0, 1.0),  # E
    _row(5, "tome", None, None, status="FAILED"),  # F
    _row(6, "dense", 85.0, 3.0, role="reference"),  # R
]
FRONT_BY_HAND = {ROWS[i]["run_id"] for i in (0, 1, 3, 4, 6)}  # E, B, D, A, R: nothing is better on both


def _report():
    selection = Selection([SweepInfo("parent", "sw", "exp", OBJECTIVES)], ROWS)
    return selection, compare(selection)


def _grid() -> TokenGrid:
    img = (np.arange(32 * 32 * 3) % 251).reshape(32, 32, 3).astype(np.uint8)
    kept = np.arange(64)
    kept[::2] = -1
    cells = [_patch_png(img, None, (8, 8), 2), _patch_png(img, kept, (8, 8), 2)]
    return TokenGrid(ROWS[0]["run_id"], "dynamicvit", {"keep_ratio": 0.5}, ["block 1: 32 of 64 patches kept"], [cells, cells], ["0/a.png", "0/b.png"])


def test_report_renders_in_chromium_one_point_per_finished_trial_and_the_front(tmp_path, render_report):
    selection, report = _report()
    assert {r["run_id"] for r in report.front} == FRONT_BY_HAND
    path = tmp_path / "report.html"
    path.write_text(build_html(report, selection.rows, URI, [_grid()]))
    page = render_report(path)
    traces = {t["name"]: t for t in page["traces"]}
    assert page["legend"] == ["dynamicvit", "tome", "Pareto front", "dense reference"]
    assert traces["dynamicvit"]["points"] == 3 and traces["tome"]["points"] == 2  # the failed trial is not drawn
    assert traces["Pareto front"]["line_vertices"] == 5 and traces["Pareto front"]["points"] == 0
    assert traces["dense reference"]["points"] == 1
    assert page["front_rows"] == 5
    assert page["token_images"] == 4  # 2 images x (input + 1 stage)
    html = path.read_text()
    for rid in FRONT_BY_HAND:  # every front run links to its MLflow page
        assert f'href="{URI}/#/experiments/7/runs/{rid}"' in html
    for r in ROWS[:5] + ROWS[6:]:  # hover text of every drawn run: its run id and searched parameters
        key, value = next(iter(r["params"].items()))
        assert f"run {r['run_id']}" in html and f"{key} = {value:.4g}" in html
    assert f"run {ROWS[5]['run_id']}" not in html  # the failed run is not drawn
    assert "<script src=" not in html  # plotly's JavaScript is embedded: the file works offline


def test_run_links_only_for_a_tracking_server():
    assert run_url("https://user:pw@mlflow.example/", "3", "abc") == "https://user:***@mlflow.example/#/experiments/3/runs/abc"
    assert run_url("sqlite:////tmp/mlflow.db", "3", "abc") is None
    selection, report = _report()
    assert "#/experiments/" not in build_html(report, selection.rows, "sqlite:////tmp/mlflow.db")


def test_patch_image_greys_dropped_patches_and_tints_merged_groups():
    img = np.full((4, 4, 3), 100, np.uint8)  # a 2 x 2 grid of 2 px patches
    token = np.array([0, -1, 1, 1])  # patch 0 alone, patch 1 dropped, patches 2 and 3 merged into one token
    out = np.asarray(Image.open(io.BytesIO(_patch_png(img, token, (2, 2), 1))).convert("RGB")).astype(int)
    assert (out[:2, :2] == 100).all()  # kept as is
    assert (out[:2, 2:] == round(0.25 * 100 + 0.75 * 200)).all()  # greyed
    tint = np.array([0xFF, 0x7F, 0x0E])  # the palette's colour of token 1
    expected = np.round(0.45 * 100 + 0.55 * tint).astype(int)
    assert (out[2:, :] == expected).all()


def test_png_and_html_written_by_one_call(tmp_path):
    selection, report = _report()
    out, png = tmp_path / "r.html", tmp_path / "front.png"
    write_report(URI, selection, report, out=str(out), png=str(png), tokens=False)
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert Image.open(png).format == "PNG"


def test_a_report_that_cannot_be_built_only_warns(mlflow_tmp, caplog):
    with caplog.at_level(logging.WARNING, logger="orchestrator.report"):
        assert log_sweep_report(mlflow_tmp, "no-such-run") is False
    assert "could not be built" in caplog.text


def test_token_grids_rebuild_each_front_model_from_its_trials_record(tmp_path, mlflow_tmp, digits_root, make_tiny_experiment):
    """A DynamicViT trial with a checkpoint and a training-free ToMe trial on the dense weights, recorded
    as sweeps record them (every config value a param, tag checkpoint_uri): the report rebuilds both."""
    import dataclasses

    import torch
    from torchvision.datasets import ImageFolder

    from methods import create_backbone, get_method
    from methods._common import vit_stem
    from methods.tome import ToMeConfig
    from orchestrator.config import to_flat_dict
    from orchestrator.report import token_grids
    from orchestrator.tracking import ROLE_TAG, Tracker

    exp = dataclasses.replace(make_tiny_experiment(digits_root), storage_path=str(tmp_path / "runs"))
    torch.manual_seed(0)
    dense_path = tmp_path / "dense.pt"
    torch.save(create_backbone(exp.model).state_dict(), dense_path)
    method = get_method("dynamicvit")
    model = method.build_model(exp.method_config, create_backbone(exp.model))
    for p in model.predictors.parameters():
        p.data.normal_(0, 0.3)  # weights the freshly built model cannot have by chance
    checkpoint = tmp_path / "checkpoint_epoch_0000"
    checkpoint.mkdir()
    torch.save({"model": model.state_dict(), "epoch": 0}, checkpoint / "state.pt")
    tome_exp = dataclasses.replace(
        exp, method="tome", method_config=ToMeConfig(r=5), model=dataclasses.replace(exp.model, pretrained=str(dense_path)),
        train=dataclasses.replace(exp.train, epochs=0),
    )
    tracker = Tracker(mlflow_tmp, "report-grids")
    dyn_id = tracker.start_run("trial_a", to_flat_dict(exp), {ROLE_TAG: "trial", "method": "dynamicvit", "checkpoint_uri": str(checkpoint)})
    tome_id = tracker.start_run("trial_b", to_flat_dict(tome_exp), {ROLE_TAG: "trial", "method": "tome"})
    rows = [{"run_id": rid, "role": "trial", "method": m, "params": {}} for rid, m in ((dyn_id, "dynamicvit"), (tome_id, "tome"))]
    rows.append({"run_id": "dense-reference", "role": "reference", "method": "dense", "params": {}})  # never drawn
    dyn, tome = token_grids(mlflow_tmp, rows, images=2)
    assert (dyn.run_id, tome.run_id) == (dyn_id, tome_id)
    assert len(dyn.rows) == 2 and all(len(r) == 1 + 3 for r in dyn.rows)  # input + 3 stages per image
    # by hand: the first two validation images by path, the checkpoint's predictor at stage 1 (44 of 64 kept)
    val = ImageFolder(str(digits_root / "val"))
    first = sorted(path for path, _ in val.samples)[:2]
    assert dyn.image_names == ["/".join(p.split("/")[-2:]) for p in first]
    from orchestrator.data import build_val_dataset

    ds = build_val_dataset(exp.data, 32)
    images = torch.stack([ds[[p for p, _ in ds.samples].index(f)][0] for f in first])
    model.eval()
    with torch.no_grad():
        x = model.vit.blocks[0](vit_stem(model.vit, images))
        scores = model.predictors[0](x[:, 1:], torch.ones(2, 64, 1))[..., 0]
    for b in range(2):
        kept = set(torch.nonzero(dyn.stages[0].token[b] >= 0).flatten().tolist())
        assert kept == set(scores[b].topk(44).indices.tolist())
    # ToMe on the dense weights: 6 merging blocks, 64 patches in 64 - 6 * 5 = 34 groups at the end
    assert len(tome.stages) == 6
    assert all(len(set(row.tolist())) == 34 for row in tome.stages[-1].token)
