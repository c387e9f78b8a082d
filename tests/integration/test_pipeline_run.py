"""``prunetune pipeline`` end to end on the digits twin of the Evo-ViT DeiT-B recipe (real Ray, 2 gloo
ranks, a real ``mlflow server``): the warm-up stage's checkpoint starts the main stage; ``--resume``
re-runs nothing; a truncated final checkpoint is detected and the stage resumes from the previous
good one to the same result; a changed input is refused with the difference."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
EVERY = 4  # train.checkpoint_every_steps of pipelines/experiments/digits_evovit.yaml


def _manifests(folder: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((folder / "manifests").glob("*.json"))}


def _state(checkpoint: str) -> dict:
    return torch.load(Path(checkpoint) / "state.pt", map_location="cpu", weights_only=True)


def _step_dirs(stage_dir: Path) -> list[int]:
    return sorted(int(p.name.rsplit("_", 1)[1]) for p in stage_dir.glob("checkpoint_step_*"))


@pytest.mark.timeout(1500)
def test_digits_pipeline_runs_resumes_and_refuses_changed_inputs(tmp_path, digits_dir, mlflow_server, run_cli):
    shutil.copytree(REPO / "pipelines", tmp_path / "pipelines")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "digits").symlink_to(digits_dir)
    pipeline = tmp_path / "pipelines" / "digits_evovit.yaml"
    experiment = "test-pipeline-digits"
    pipeline.write_text(pipeline.read_text().replace("experiment: digits-evovit", f"experiment: {experiment}"))
    args = ("pipeline", str(pipeline), "--tracking-uri", mlflow_server)
    folder = tmp_path / "prunetune_runs" / "digits-evovit"

    first = run_cli(*args, cwd=tmp_path, timeout=900)
    assert first.returncode == 0, first.stderr[-4000:]
    m = _manifests(folder)
    assert {k: v["status"] for k, v in m.items()} == {"warmup": "finished", "main": "finished"}
    warm, main = m["warmup"], m["main"]
    # the main stage started from the warm-up's final checkpoint, recorded by URI and digest
    assert main["upstream_checkpoint"] == warm["checkpoint"] and main["upstream_sha256"] == warm["sha256"]
    assert hashlib.sha256((Path(warm["checkpoint"]) / "state.pt").read_bytes()).hexdigest() == warm["sha256"]
    ws, ms = _state(warm["checkpoint"]), _state(main["checkpoint"])
    steps = ws["step"]  # optimizer steps of one epoch
    assert (ws["epoch"], ms["epoch"]) == (0, 1)
    assert ms["step"] == 2 * steps  # continued from the warm-up's step count: one more epoch, not two from scratch
    # mid-epoch checkpoints every 4 steps (not at an epoch's end), pruned to checkpoints_to_keep = 2
    assert _step_dirs(folder / "warmup") == [s for s in range(EVERY, steps, EVERY)][-2:]
    assert _step_dirs(folder / "main") == [s for s in range(steps + 1, 2 * steps) if s % EVERY == 0][-2:]

    client = MlflowClient(mlflow_server)
    exp_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([exp_id])
    parent = [r for r in runs if r.data.tags.get("prunetune.role") == "pipeline"]
    assert len(parent) == 1 and len(runs) == 3
    children = {r.data.tags["prunetune.stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id}
    assert {k: v.info.run_id for k, v in children.items()} == {"warmup": warm["mlflow_run_id"], "main": main["mlflow_run_id"]}
    assert all(r.info.status == "FINISHED" for r in runs)
    # each stage trained its own epochs only: the warm-up epoch 0, the main stage epoch 1
    assert [x.step for x in client.get_metric_history(warm["mlflow_run_id"], "train_loss")] == [0]
    assert [x.step for x in client.get_metric_history(main["mlflow_run_id"], "train_loss")] == [1]
    first_top1 = main["metrics"]["val_top1"]

    # --resume: nothing is re-run, nothing new is recorded, and no Ray is started (no new session of it)
    sessions = set(Path("/tmp/ray").glob("session_2*"))
    again = run_cli(*args, "--resume", cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    assert set(Path("/tmp/ray").glob("session_2*")) == sessions
    assert "ran nothing; skipped (finished earlier) warmup, main" in again.stdout
    assert _manifests(folder) == m
    assert len(client.search_runs([exp_id])) == 3
    assert [x.step for x in client.get_metric_history(main["mlflow_run_id"], "train_loss")] == [1]

    # The driver died after the main stage's last checkpoint but before its manifest said so, and that
    # checkpoint was truncated: --resume verifies it, falls back to the newest good (mid-epoch) one and
    # retrains only the rest of epoch 1, to the same result (exact resume across 2 ranks).
    broken = Path(main["checkpoint"]) / "state.pt"
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 3])
    (folder / "manifests" / "main.json").write_text(json.dumps({**main, "status": "running"}))
    previous_good = _step_dirs(folder / "main")[-1]
    third = run_cli(*args, "--resume", cwd=tmp_path, timeout=900)
    assert third.returncode == 0, third.stderr[-4000:]
    out = third.stdout + third.stderr
    assert f"{main['checkpoint']}: state.pt is" in out and "(truncated); falling back" in out
    assert f"resuming from {folder / 'main' / f'checkpoint_step_{previous_good:08d}'}" in out
    assert f"resuming trial at epoch 1, batch {previous_good - steps} (step {previous_good})" in out
    assert "ran main; skipped (finished earlier) warmup" in third.stdout
    m3 = _manifests(folder)
    assert m3["warmup"] == warm and m3["main"]["status"] == "finished" and m3["main"]["mlflow_run_id"] == main["mlflow_run_id"]
    assert _state(m3["main"]["checkpoint"])["step"] == 2 * steps
    assert m3["main"]["metrics"]["val_top1"] == pytest.approx(first_top1)
    assert len(client.search_runs([exp_id])) == 3

    # a changed input is refused, naming the key, before anything runs or is recorded
    exp_file = tmp_path / "pipelines" / "experiments" / "digits_evovit.yaml"
    exp_file.write_text(exp_file.read_text().replace("lr: 1.0e-3", "lr: 2.0e-3"))
    refused = run_cli(*args, "--resume", cwd=tmp_path, timeout=300)
    assert refused.returncode == 2
    assert "prunetune: error: stage warmup: its inputs changed since it ran (train.lr: 0.001 -> 0.002)" in refused.stderr
    assert _manifests(folder) == m3 and len(client.search_runs([exp_id])) == 3


def test_a_sweep_stage_searches_from_the_dense_stages_backbone(tmp_path, digits_dir, mlflow_server, run_cli):
    """A dense train stage, then a sweep stage (ToMe, training-free) whose every trial starts from the
    backbone the dense stage exported; its sweep is nested under the pipeline run; --resume skips both."""
    import yaml

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "digits").symlink_to(digits_dir)
    exp = yaml.safe_load((REPO / "pipelines" / "experiments" / "digits_evovit.yaml").read_text())
    exp["data"]["path"] = "data/digits"
    exp["storage_path"] = "runs"
    experiment = "test-pipeline-sweep"
    exp["tracking"] = {"experiment": experiment}
    exp["train"].update(epochs=4, lr=2.0e-3, checkpoint_every_steps=0)
    exp["resources"] = {"num_workers": 1, "cpus_per_worker": 2}
    (tmp_path / "dense.yaml").write_text(yaml.safe_dump({**exp, "method": "dense"}))
    (tmp_path / "tome.yaml").write_text(yaml.safe_dump({
        **exp, "method": {"name": "tome"},
        "sweep": {"search_space": "tome", "num_samples": 2, "max_concurrent_trials": 1, "seed": 0},
    }))
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump({
        "name": "dense-then-tome", "storage_path": "runs", "tracking": {"experiment": experiment},
        "stages": [{"name": "dense", "kind": "train", "config": "dense.yaml"},
                   {"name": "search", "kind": "sweep", "config": "tome.yaml", "from": "dense"}],
    }))
    args = ("pipeline", str(pipeline), "--tracking-uri", mlflow_server)
    first = run_cli(*args, cwd=tmp_path, timeout=900)
    assert first.returncode == 0, first.stderr[-4000:]
    m = _manifests(tmp_path / "runs" / "dense-then-tome")
    assert {k: v["status"] for k, v in m.items()} == {"dense": "finished", "search": "finished"}
    backbone = m["dense"]["backbone"]
    assert m["search"]["upstream_checkpoint"] == backbone and Path(backbone).is_file()

    client = MlflowClient(mlflow_server)
    exp_id = client.get_experiment_by_name(experiment).experiment_id
    (pipe_run,) = client.search_runs([exp_id], filter_string="tags.`prunetune.role` = 'pipeline'")
    (sweep_run,) = client.search_runs([exp_id], filter_string="tags.`prunetune.role` = 'sweep'")
    assert sweep_run.info.run_id == m["search"]["mlflow_run_id"] and sweep_run.info.status == "FINISHED"
    assert sweep_run.data.tags["mlflow.parentRunId"] == pipe_run.info.run_id
    trials = client.search_runs([exp_id], filter_string="tags.`prunetune.role` = 'trial'")
    assert len(trials) == 2 and all(t.info.status == "FINISHED" for t in trials)
    assert {t.data.params["model.pretrained"] for t in trials} == {backbone}  # every trial from the dense stage's weights
    # the dense stage's trained weights, not random ones (10% on the digits): ToMe keeps most of its accuracy
    (dense_run,) = client.search_runs([exp_id], filter_string="tags.`prunetune.stage` = 'dense' AND tags.`prunetune.role` = 'stage'")
    dense_top1 = dense_run.data.metrics["val_top1"]
    assert dense_top1 > 30.0
    assert all(t.data.metrics["val_top1"] >= 0.7 * dense_top1 for t in trials), [t.data.metrics["val_top1"] for t in trials]

    recorded = len(client.search_runs([exp_id]))
    again = run_cli(*args, "--resume", cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "ran nothing; skipped (finished earlier) dense, search" in again.stdout
    assert len(client.search_runs([exp_id])) == recorded
