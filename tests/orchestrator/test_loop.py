"""The training loop on CPU without Ray: dense pre-training, a DynamicViT trial, checkpoints, NaN."""
from __future__ import annotations

import dataclasses
import math
import time

import pytest
import torch

from orchestrator import loop

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_torch_thread")




class Recorder:
    """A ``loop.Report`` that keeps every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict, dict | None]] = []

    def __call__(self, metrics, state) -> None:
        self.calls.append((dict(metrics), state))


@pytest.fixture(scope="module")
def exp(small_digits, make_tiny_experiment):
    return make_tiny_experiment(small_digits)


@pytest.fixture(scope="module")
def pretrained(exp, tmp_path_factory):
    """One epoch of dense pre-training, its reports, and its weights exported as the sweep does."""
    run = loop.build_run(exp, "pretrain", CPU)
    report = Recorder()
    final = loop.fit(run, report)
    path = tmp_path_factory.mktemp("weights") / "dense_backbone.pt"
    state = report.calls[-1][1]
    torch.save({"model": {k.removeprefix("vit."): v for k, v in state["model"].items()}}, path)
    return {"run": run, "report": report, "final": final, "path": path}


@pytest.fixture(scope="module")
def trial(exp, pretrained):
    started = time.time()  # as a trial's driver marks its start
    run = loop.build_run(exp, "trial", CPU, pretrained_path=str(pretrained["path"]))
    built = time.time()
    run.started_at = started
    report = Recorder()
    final = loop.fit(run, report)
    return {"run": run, "report": report, "final": final, "wall": {"build": built - started, "total": time.time() - started}}


def test_pretrain_reports_each_epoch(pretrained, exp):
    calls = pretrained["report"].calls
    assert len(calls) == exp.pretrain.epochs == 1  # pretrain: no extra final report
    metrics, state = calls[0]
    assert metrics["epoch"] == 0
    assert math.isfinite(metrics["train_loss"]) and metrics["train_loss"] > 0
    assert 0 <= metrics["val_top1"] <= 100 and metrics["val_top1"] <= metrics["val_top5"] <= 100
    assert math.isfinite(metrics["val_loss"]) and metrics["val_loss"] > 0
    assert metrics["lr"] > 0 and metrics["epoch_time_s"] > 0
    assert pretrained["final"] == {k: v for k, v in metrics.items() if k.startswith("val_") or k == "epoch"}


def test_pretrain_checkpoint_state(pretrained, small_digits):
    run = pretrained["run"]
    state = pretrained["report"].calls[0][1]
    images = len(list(small_digits.glob("train/*/*.png")))  # 10 classes x 32
    assert images == 320
    assert state["epoch"] == 0 and state["step"] == run.step == len(run.train_loader) == images // 64
    assert state["stage"] == "pretrain" and state["method"] == "dense"
    assert set(state["model"]) == set(run.raw.state_dict()) and all(k.startswith("vit.") for k in state["model"])
    assert state["optimizer"]["state"] and "param_groups" in state["optimizer"]
    assert state["metrics"]["val_top1"] == pretrained["final"]["val_top1"]
    untrained = loop.build_run(run.exp, "pretrain", CPU).raw.state_dict()  # same seed: the same initial weights
    changed = [k for k, v in untrained.items() if not torch.equal(v, state["model"][k])]
    assert "vit.head.weight" in changed and "vit.blocks.0.attn.qkv.weight" in changed


def test_trial_final_report_measures_the_sparse_model(trial, exp):
    calls = trial["report"].calls
    assert len(calls) == exp.train.epochs + 1
    epoch_metrics, state = calls[0]
    assert state is not None and state["method"] == "dynamicvit" and state["stage"] == "trial"
    assert 0 <= epoch_metrics["val_top1"] <= epoch_metrics["val_top5"] <= 100
    assert {"train_task_loss", "train_loss"} <= set(epoch_metrics)
    final, final_state = calls[-1]
    assert final_state is None and final == trial["final"]
    for key in ("latency_ms", "throughput_ips", "dense_latency_ms", "dense_throughput_ips", "speedup", "throughput_ratio", "gflops", "dense_gflops"):
        assert math.isfinite(final[key]) and final[key] > 0, key
    assert final["gflops"] < final["dense_gflops"]
    assert final["val_top1"] == epoch_metrics["val_top1"] and final["epoch"] == 0
    assert final["params_m"] > 0


def test_trial_starts_from_the_pretrained_weights(exp, pretrained):
    run = loop.build_run(exp, "trial", CPU, pretrained_path=str(pretrained["path"]))
    dense_state = pretrained["report"].calls[0][1]["model"]
    assert torch.equal(run.dense.vit.blocks[2].mlp.fc1.weight, dense_state["vit.blocks.2.mlp.fc1.weight"])
    assert torch.equal(run.teacher.vit.pos_embed, dense_state["vit.pos_embed"])
    assert not any(p.requires_grad for p in run.teacher.parameters())
    fresh = loop.build_run(exp, "trial", CPU)  # no weights: a different (random) backbone
    assert not torch.equal(fresh.dense.vit.blocks[2].mlp.fc1.weight, dense_state["vit.blocks.2.mlp.fc1.weight"])


def test_restore_resumes_at_the_next_epoch(exp, pretrained):
    state = pretrained["report"].calls[0][1]
    two = dataclasses.replace(exp, pretrain=dataclasses.replace(exp.pretrain, epochs=2))
    run = loop.build_run(two, "pretrain", CPU)
    loop.restore(run, state)
    assert (run.epoch, run.step) == (1, state["step"])
    for k, v in state["model"].items():
        assert torch.equal(run.raw.state_dict()[k], v), k
    restored_opt = run.optimizer.state_dict()
    assert restored_opt["state"].keys() == state["optimizer"]["state"].keys()
    assert torch.equal(restored_opt["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    report = Recorder()
    loop.fit(run, report)
    assert [m["epoch"] for m, _ in report.calls] == [1]  # only the remaining epoch
    assert report.calls[0][1]["step"] == 2 * state["step"] and report.calls[0][1]["epoch"] == 1


def test_resume_after_the_last_epoch_evaluates_once(exp, pretrained):
    state = pretrained["report"].calls[0][1]
    run = loop.build_run(exp, "pretrain", CPU)
    loop.restore(run, state)
    report = Recorder()
    final = loop.fit(run, report)
    assert report.calls == []
    assert final["epoch"] == 0 and final["val_top1"] == pytest.approx(pretrained["final"]["val_top1"])


def test_non_finite_loss_stops_the_run(exp):
    run = loop.build_run(exp, "pretrain", CPU)
    with torch.no_grad():
        run.raw.vit.head.weight[0, 0] = float("nan")
    report = Recorder()
    with pytest.raises(loop.NonFiniteLossError, match="epoch 0, step 0"):
        loop.fit(run, report)
    assert report.calls == []
    assert isinstance(loop.NonFiniteLossError("x"), FloatingPointError)


def test_mo_asha_trials_report_their_cost_with_every_epoch(exp, pretrained):
    """With early stopping over accuracy and latency, each epoch's report carries the latency measured
    before training (MO-ASHA ranks rungs on both); without it, epochs carry no cost metric."""
    import dataclasses

    from orchestrator.config import AshaConfig, Objective

    sweep = dataclasses.replace(exp.sweep, asha=AshaConfig(), objectives=(Objective("val_top1", "max"), Objective("gflops", "min")))
    mo = dataclasses.replace(exp, sweep=sweep, train=dataclasses.replace(exp.train, epochs=2))
    for config, carries in ((mo, True), (dataclasses.replace(mo, sweep=dataclasses.replace(sweep, asha=None)), False)):
        run = loop.build_run(config, "trial", CPU, pretrained_path=str(pretrained["path"]))
        reports = []
        final = loop.fit(run, lambda m, state: reports.append(m))
        epochs = [r for r in reports if "train_loss" in r]
        assert len(epochs) == 2
        assert all(("gflops" in r) == carries for r in epochs)
        assert all("latency_ms" not in r for r in epochs)  # only the objectives' costs
        if carries:  # the model's GFLOPs do not depend on its weights: before training = after
            assert epochs[0]["gflops"] == pytest.approx(final["gflops"], rel=1e-9)


def test_early_cost_leaves_the_training_random_stream_alone(exp, pretrained):
    """MO-ASHA's early measurement (random inputs) must not shift the generator training draws from:
    a sweep with it trains as one without it."""
    from dataclasses import replace

    from orchestrator.config import AshaConfig, Objective

    sweep = replace(exp.sweep, asha=AshaConfig(), objectives=(Objective("val_top1", "max"), Objective("latency_ms", "min")))
    run = loop.build_run(replace(exp, sweep=sweep), "trial", CPU, pretrained_path=str(pretrained["path"]))
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    cost = loop.early_cost(run)
    assert cost and cost["latency_ms"] > 0  # it really measured
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    loop.early_cost(run)
    assert torch.equal(torch.rand(3), expected)


def test_reports_carry_the_phase_times(trial, exp):
    """Each epoch's report carries the cumulative phase times, the final one all of them; checked
    against the test's own clock: start-up covers building the run, the first step comes after
    start-up and within the first epoch, and the phases add up to no more than the wall time."""
    (epoch, _), (final, _) = trial["report"].calls
    wall = trial["wall"]
    assert epoch["time_train_s"] >= epoch["epoch_time_s"] > 0  # one epoch so far (plus the epoch-end hook)
    assert epoch["time_eval_s"] > 0
    assert epoch.get("time_measure_s", 0.0) < 0.5  # no MO-ASHA: nothing measured before training
    assert final["time_startup_s"] >= wall["build"]
    assert final["time_startup_s"] < final["time_to_first_step_s"] < final["time_startup_s"] + epoch["time_train_s"]
    assert final["time_measure_s"] > 0 and final["time_checkpoint_s"] >= 0
    phases = sum(final[f"time_{p}_s"] for p in ("startup", "train", "eval", "measure", "checkpoint"))
    assert phases <= wall["total"] + 1e-3
    assert final["time_train_s"] >= epoch["time_train_s"] and final["time_eval_s"] > epoch["time_eval_s"] * 0.99
