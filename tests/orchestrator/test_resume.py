"""Exact resume on CPU without Ray: a run stopped mid-epoch and resumed from its step checkpoint
ends with the weights and metrics of the same run left alone; checkpoints of another method or
backbone are refused; truncated checkpoints are detected and skipped for the previous good one."""
from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch

from methods.dense import DenseConfig
from orchestrator import checkpoints, loop
from orchestrator.resume import CheckpointMismatchError, ResumableSampler

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_torch_thread")
STEPS_PER_EPOCH = 5  # 320 images / batch 64


@pytest.fixture(scope="module")
def exp(small_digits, make_tiny_experiment):
    """Dense training from scratch for 2 epochs with augmentations and drop-path (random draws every
    step), a step checkpoint every 2 steps: steps 2, 4, 6, 8 (6 is inside epoch 1)."""
    base = make_tiny_experiment(small_digits)
    return dataclasses.replace(
        base, method="dense", method_config=DenseConfig(), model=dataclasses.replace(base.model, drop_path_rate=0.1),
        train=dataclasses.replace(base.train, epochs=2, checkpoint_every_steps=2, warmup_epochs=0.5),
    )


class Stop(Exception):
    """The injected failure."""


def _train(exp, stop_at: int | None = None, state: dict | None = None, folder=None):
    """fit(); each step checkpoint is written atomically under ``folder``; ``stop_at`` raises after
    that step's checkpoint. Returns (final metrics, epoch reports, the model's state)."""
    run = loop.build_run(exp, "trial", CPU)
    if state is not None:
        loop.restore(run, state)
    steps: list[int] = []

    def on_step(s):
        steps.append(s["step"])
        if folder is not None:
            checkpoints.write(s, folder / checkpoints.step_dir_name(s["step"]))
        if s["step"] == stop_at:
            raise Stop(s["step"])

    run.on_step_checkpoint = on_step
    reports: list[dict] = []
    final = loop.fit(run, lambda m, st: reports.append(dict(m)) if "train_loss" in m else None)  # epochs, not the final measurement
    return final, reports, {k: v.clone() for k, v in run.raw.state_dict().items()}, steps


@pytest.fixture(scope="module")
def uninterrupted(exp):
    return _train(exp)


def _scramble_generators():
    """What a fresh process would have: other generator states than the checkpointed ones."""
    torch.manual_seed(987)
    np.random.seed(987)
    random.seed(987)


def test_step_checkpoints_are_taken_every_n_steps_inside_epochs(uninterrupted):
    # every 2 steps of 10, but not at an epoch's last step (the epoch checkpoint covers it)
    assert uninterrupted[3] == [2, 4, 6, 8]


def test_resumed_mid_epoch_equals_uninterrupted(exp, uninterrupted, tmp_path):
    with pytest.raises(Stop):
        _train(exp, stop_at=6, folder=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoints.step_dir_name(s) for s in (2, 4, 6)]
    state = checkpoints.load(str(tmp_path / checkpoints.step_dir_name(6)))
    assert (state["epoch"], state["batch"], state["step"]) == (0, 1, 6)  # epoch 0 done, 1 batch of epoch 1
    _scramble_generators()
    final, reports, weights, steps = _train(exp, state=state)
    assert steps == [8]  # only the remaining steps ran
    assert [r["epoch"] for r in reports] == [1]
    ref_final, ref_reports, ref_weights, _ = uninterrupted
    for k, v in ref_weights.items():
        torch.testing.assert_close(weights[k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert final["val_top1"] == pytest.approx(ref_final["val_top1"])
    assert final["val_loss"] == pytest.approx(ref_final["val_loss"], rel=1e-5)
    # the resumed epoch's training loss averages all its 5 batches, the first one from before the stop
    assert reports[0]["train_loss"] == pytest.approx(ref_reports[1]["train_loss"], rel=1e-5)
    assert reports[0]["train_samples"] == ref_reports[1]["train_samples"] == STEPS_PER_EPOCH * 64


def test_without_the_generator_states_the_resume_differs(exp, uninterrupted, tmp_path):
    """The control: the exact match above needs the restored generators (augmentation, drop-path)."""
    with pytest.raises(Stop):
        _train(exp, stop_at=6, folder=tmp_path)
    state = checkpoints.load(str(tmp_path / checkpoints.step_dir_name(6)))
    del state["rng"]
    _scramble_generators()
    _, _, weights, _ = _train(exp, state=state)
    diff = max((weights[k] - v).abs().max().item() for k, v in uninterrupted[2].items())
    assert diff > 1e-4


def test_resumable_sampler_skips_the_done_batches():
    data = list(range(20))
    full = ResumableSampler(data, seed=3)
    full.set_position(2, 0)
    order = list(full)
    part = ResumableSampler(data, seed=3)
    part.set_position(2, 8)
    assert len(part) == 12 and list(part) == order[8:]
    assert len(part) == 20 and list(part) == order  # only that one epoch is partial
    two = [ResumableSampler(data, num_replicas=2, rank=r, seed=3) for r in (0, 1)]
    for s in two:
        s.set_position(2, 4)
    shards = [list(s) for s in two]
    assert len(shards[0]) == len(shards[1]) == 6 and not set(shards[0]) & set(shards[1])


def test_checkpoint_of_another_method_is_refused(exp, uninterrupted, tmp_path, make_tiny_experiment, small_digits):
    state = checkpoints.load(str(_one_checkpoint(exp, tmp_path)))
    other = make_tiny_experiment(small_digits)  # DynamicViT
    run = loop.build_run(other, "trial", CPU)
    with pytest.raises(CheckpointMismatchError, match="method dense on backbone vit_tiny_patch16_224, but this run is method dynamicvit"):
        loop.restore(run, state)
    state["backbone"] = "deit_small_patch16_224"
    run = loop.build_run(exp, "trial", CPU)
    with pytest.raises(CheckpointMismatchError, match="backbone deit_small_patch16_224, but this run is method dense on backbone vit_tiny"):
        loop.restore(run, state)


def _one_checkpoint(exp, tmp_path):
    with pytest.raises(Stop):
        _train(exp, stop_at=2, folder=tmp_path)
    return tmp_path / checkpoints.step_dir_name(2)


def test_truncated_latest_checkpoint_falls_back_to_the_previous(exp, tmp_path, caplog):
    with pytest.raises(Stop):
        _train(exp, stop_at=4, folder=tmp_path)
    latest = tmp_path / checkpoints.step_dir_name(4) / checkpoints.STATE_FILE
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    with caplog.at_level("WARNING", logger="orchestrator.checkpoints"):
        found = checkpoints.latest_good(str(tmp_path))
    assert found.folder == str(tmp_path / checkpoints.step_dir_name(2))
    assert found.state["step"] == 2
    assert [f for f, _ in found.skipped] == [str(tmp_path / checkpoints.step_dir_name(4))]
    assert "truncated" in found.skipped[0][1] and "truncated" in caplog.text
    # a bit flipped in place (same size): the sha256 catches it
    good = tmp_path / checkpoints.step_dir_name(2) / checkpoints.STATE_FILE
    raw = bytearray(good.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    good.write_bytes(bytes(raw))
    assert checkpoints.latest_good(str(tmp_path)) is None


def test_a_crash_during_a_save_keeps_the_good_checkpoint(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoint_epoch_0001"
    checkpoints.write({"step": 5, "epoch": 1, "model": {"w": torch.ones(3)}}, folder)

    def dies(obj, f, *a, **k):
        f.write(b"half a pick")
        raise OSError("disk gone")

    monkeypatch.setattr(torch, "save", dies)
    with pytest.raises(OSError):
        checkpoints.write({"step": 6, "epoch": 1, "model": {"w": torch.zeros(3)}}, folder)
    monkeypatch.undo()
    assert torch.equal(checkpoints.load(str(folder))["model"]["w"], torch.ones(3))
    assert [p.name for p in folder.iterdir() if p.name.endswith(".tmp")] == []


def test_prune_keeps_the_newest_step_checkpoints(tmp_path):
    for step in (2, 4, 6, 8):
        checkpoints.write({"step": step, "epoch": 0}, tmp_path / checkpoints.step_dir_name(step))
    checkpoints.write({"step": 5, "epoch": 0}, tmp_path / "checkpoint_epoch_0000")
    removed = checkpoints.prune_steps(str(tmp_path), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch_0000", checkpoints.step_dir_name(6), checkpoints.step_dir_name(8)]
    assert len(removed) == 2
    checkpoints.prune_steps(str(tmp_path), keep=2, after_step=6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch_0000", checkpoints.step_dir_name(8)]
    assert [f.rsplit("/", 1)[1] for f in checkpoints.candidates(str(tmp_path))] == [checkpoints.step_dir_name(8), "checkpoint_epoch_0000"]


def test_step_checkpoints_on_s3_are_verified_pruned_and_skipped_when_broken(s3_endpoint, monkeypatch, tmp_path):
    """The same on S3 (moto's server): save, fall back past a truncated object, prune."""
    import boto3

    from orchestrator import storage

    for k, v in {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(storage, "_CACHE", tmp_path / "cache")
    client = boto3.client("s3")
    client.create_bucket(Bucket="prunetune-ckpt")
    run_dir = "s3://prunetune-ckpt/runs/trial_x"
    for step in (2, 4, 6):
        checkpoints.save_step({"step": step, "epoch": 0, "batch": step, "model": {"w": torch.full((4,), float(step))}}, run_dir)
    key = f"runs/trial_x/{checkpoints.step_dir_name(6)}/{checkpoints.STATE_FILE}"
    body = client.get_object(Bucket="prunetune-ckpt", Key=key)["Body"].read()
    client.put_object(Bucket="prunetune-ckpt", Key=key, Body=body[:100])
    found = checkpoints.latest_good(run_dir)
    assert found.folder == f"{run_dir}/{checkpoints.step_dir_name(4)}" and torch.equal(found.state["model"]["w"], torch.full((4,), 4.0))
    assert found.skipped[0][0] == f"{run_dir}/{checkpoints.step_dir_name(6)}"
    checkpoints.prune_steps(run_dir, keep=1)
    assert storage.list_dirs(run_dir) == [checkpoints.step_dir_name(6)]
