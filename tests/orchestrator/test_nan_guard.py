"""The NaN guard on two real gloo ranks (no Ray): a NaN injected on one rank only is seen by both in
the same step; skip, rollback to the last good checkpoint with a lowered LR, and giving up."""
from __future__ import annotations

import dataclasses
import json
import os
import traceback
from pathlib import Path

import pytest
import torch

from orchestrator.config import NanGuardConfig, TrainConfig
from orchestrator.nan_guard import NAN_EVENTS_KEY, TEST_INJECT_NAN_ENV
from ports import free_port as _free_port
from ranks import spawn_ranks

PER_RANK_STEPS = 5  # 160 train images, 2 ranks, batch 16
MIN_LR = 1e-5


def _scenario(exp, rank: int, inject: dict, out: Path) -> None:
    """Train ``exp``'s dense pre-training on this rank under DDP with ``inject``; save what happened."""
    from torch.nn.parallel import DistributedDataParallel

    from orchestrator import loop

    os.environ[TEST_INJECT_NAN_ENV] = json.dumps(inject)
    run = loop.build_run(exp, "pretrain", torch.device("cpu"), rank=rank, world_size=2)
    run.model = DistributedDataParallel(run.raw)
    reports: list[dict] = []
    states: list = []

    def report(metrics, state):
        reports.append(dict(metrics))
        states.append(None if state is None else {"epoch": state["epoch"], "step": state["step"], "nan_guard": state["nan_guard"]})

    result: dict = {"reports": reports, "states": states}
    try:
        loop.fit(run, report)
    except loop.NonFiniteLossError as e:
        result["error"] = str(e)
    result["finite"] = all(torch.isfinite(p).all().item() for p in run.raw.parameters())
    result["weights"] = [p.detach().clone() for p in run.raw.parameters()]
    result["events"] = run.nan_guard.events
    result["step"] = run.step
    result["amp"] = run.train_cfg.amp
    result["fp32_attention"] = run.nan_guard.fp32_attention
    torch.save(result, out)


def _rank_main(rank: int, port: int, scenarios: list, folder: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        for name, exp, inject in scenarios:
            try:
                _scenario(exp, rank, inject, Path(folder) / f"{name}_{rank}.pt")
            except Exception:
                (Path(folder) / f"{name}_{rank}.err").write_text(traceback.format_exc())
                raise
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def outcomes(make_digits_subset, make_tiny_experiment, tmp_path_factory):
    """Three 2-epoch dense runs on 2 ranks, NaN injected on rank 1 only:

    * ``skip``: once at step 2 (epoch 0), policies as shipped -> the batch is skipped;
    * ``rollback``: once at step 7 (epoch 1), policy ``lower_lr`` -> back to the epoch-0 checkpoint, LR x 0.5;
    * ``give_up``: at every step from 7, policies (skip_batch, lower_lr), 2 retries -> the run fails;
    * ``amp_off`` / ``fp32_attention``: once at step 7 of an AMP run, that policy alone -> back to the
      epoch-0 checkpoint, then the rest without AMP / with attention in fp32. (AMP itself runs on CUDA
      only, so on CPU this checks the rollback and the switch, not fp16 arithmetic.)
    """
    base = make_tiny_experiment(make_digits_subset(16, 4))
    base = dataclasses.replace(base, model=dataclasses.replace(base.model, depth=2, embed_dim=48, num_heads=2))

    def exp(amp=False, **guard):
        pretrain = TrainConfig(epochs=2, batch_size=16, lr=2e-3, min_lr=MIN_LR, warmup_epochs=0, amp=amp, nan_guard=NanGuardConfig(**guard))
        return dataclasses.replace(base, pretrain=pretrain)

    scenarios = [
        ("skip", exp(), {"rank": 1, "steps": [2]}),
        ("rollback", exp(policies=("lower_lr",)), {"rank": 1, "steps": [PER_RANK_STEPS + 2]}),
        ("give_up", exp(policies=("skip_batch", "lower_lr"), max_retries=2), {"rank": 1, "from_step": PER_RANK_STEPS + 2}),
        ("amp_off", exp(amp=True, policies=("amp_off",)), {"rank": 1, "steps": [PER_RANK_STEPS + 2]}),
        ("fp32_attention", exp(amp=True, policies=("fp32_attention",)), {"rank": 1, "steps": [PER_RANK_STEPS + 2]}),
    ]
    folder = tmp_path_factory.mktemp("ranks")
    spawn_ranks(_rank_main, (_free_port(), scenarios, str(folder)))
    return {name: [torch.load(folder / f"{name}_{r}.pt", weights_only=False) for r in (0, 1)] for name, _, _ in scenarios}


def _epoch_reports(result: dict) -> list[dict]:
    return [m for m in result["reports"] if "train_loss" in m]


def test_a_nan_on_one_rank_is_skipped_on_both_in_the_same_step(outcomes):
    r0, r1 = outcomes["skip"]
    for r in (r0, r1):
        assert [(e["epoch"], e["step"], e["policy"]) for e in r["events"]] == [(0, 2, "skip_batch")]
        assert "error" not in r and r["finite"]
        # One update fewer than batches: 2 epochs x 5 batches, one skipped (the step count does not advance).
        assert r["step"] == 2 * PER_RANK_STEPS - 1
        assert [m["epoch"] for m in _epoch_reports(r)] == [0, 1]
    assert all(torch.equal(a, b) for a, b in zip(r0["weights"], r1["weights"]))  # the ranks stayed in step
    first, second = _epoch_reports(r0)
    assert first["nan_events"] == 1 and second["nan_events"] == 1  # the count so far, for MLflow
    assert [e["policy"] for e in json.loads(second[NAN_EVENTS_KEY])] == ["skip_batch"]
    assert r0["states"][-1]["nan_guard"]["events"] == r0["events"]  # the checkpoint carries them


def test_rollback_returns_to_the_last_good_checkpoint_and_lowers_the_lr(outcomes):
    r0, r1 = outcomes["rollback"]
    for r in (r0, r1):
        assert [(e["epoch"], e["step"], e["policy"]) for e in r["events"]] == [(1, PER_RANK_STEPS + 2, "lower_lr")]
        assert "error" not in r and r["finite"]
        # Epoch 1 ran again from the epoch-0 checkpoint: every one of its 5 steps counted once.
        assert r["step"] == 2 * PER_RANK_STEPS
        assert [m["epoch"] for m in _epoch_reports(r)] == [0, 1]  # no epoch reported twice
    assert all(torch.equal(a, b) for a, b in zip(r0["weights"], r1["weights"]))
    first, second = _epoch_reports(r0)
    # The cosine schedule ends at min_lr: halved by lower_lr (0.5 x 1e-5), where epoch 0 ended on the full schedule.
    assert second["lr"] == pytest.approx(0.5 * MIN_LR, rel=1e-6)
    assert first["lr"] > 10 * MIN_LR and first["nan_events"] == 0
    assert r0["states"][-1]["nan_guard"]["lr_scale"] == 0.5 and r0["states"][-1]["step"] == 2 * PER_RANK_STEPS


def test_out_of_retries_the_run_fails_with_the_reason_and_keeps_its_checkpoint(outcomes):
    r0, r1 = outcomes["give_up"]
    for r in (r0, r1):
        err = r["error"]
        assert f"at epoch 1, step {PER_RANK_STEPS + 2}" in err and "gave up after 2 retries" in err
        assert f"skip_batch@step{PER_RANK_STEPS + 2}, lower_lr@step{PER_RANK_STEPS + 2}" in err
        assert "last good checkpoint (epoch 0) is kept" in err
        assert [e["policy"] for e in r["events"]] == ["skip_batch", "lower_lr", "gave_up"]
        assert r["finite"]  # rolled back to the epoch-0 weights, never updated with a NaN
    # Epoch 0's report and checkpoint were made before the failure: that is what is kept.
    assert [m["epoch"] for m in _epoch_reports(r0)] == [0]
    assert r0["states"][0]["epoch"] == 0 and r0["states"][0]["step"] == PER_RANK_STEPS


@pytest.mark.parametrize("policy", ["amp_off", "fp32_attention"])
def test_amp_policies_roll_back_and_switch_for_the_rest_of_the_run(outcomes, policy):
    r0, r1 = outcomes[policy]
    for r in (r0, r1):
        assert [(e["epoch"], e["step"], e["policy"]) for e in r["events"]] == [(1, PER_RANK_STEPS + 2, policy)]
        assert "error" not in r and r["finite"]
        assert r["step"] == 2 * PER_RANK_STEPS  # epoch 1 again from the epoch-0 checkpoint, each step once
        # The switch holds from the rollback on (both ranks), and only the chosen one is made.
        assert r["amp"] is (policy != "amp_off") and r["fp32_attention"] is (policy == "fp32_attention")
    assert all(torch.equal(a, b) for a, b in zip(r0["weights"], r1["weights"]))
    first, second = r0["states"]
    assert not first["nan_guard"][policy] and second["nan_guard"][policy]  # checkpointed: a resume keeps it
    assert second["nan_guard"]["lr_scale"] == 1.0  # no LR change with these policies


def test_nan_guard_config_from_set_and_refusals(digits_root, make_tiny_experiment):
    from orchestrator.config import ConfigError, apply_overrides

    exp = make_tiny_experiment(digits_root)
    assert exp.train.nan_guard.policies == ("skip_batch", "lower_lr", "amp_off", "fp32_attention")
    changed = apply_overrides(exp, {"train.nan_guard.policies": ["lower_lr", "amp_off"], "train.nan_guard.max_retries": 2})
    assert changed.train.nan_guard == NanGuardConfig(policies=("lower_lr", "amp_off"), max_retries=2)
    with pytest.raises(ConfigError, match="'halve_batch' is not one of"):
        apply_overrides(exp, {"train.nan_guard.policies": ["halve_batch"]})
    with pytest.raises(ConfigError, match="lr_factor must be in"):
        apply_overrides(exp, {"train.nan_guard.lr_factor": 1.5})


def test_the_failure_reason_is_the_guard_line_of_a_wrapped_worker_error():
    from orchestrator.driver import failure_reason

    wrapped = RuntimeError(
        "Training failed due to worker errors:\n[Rank 0 Error Snippet]:\nTraceback (most recent call last):\n"
        '  File "loop.py", line 1, in fit\n    raise NonFiniteLossError(\n'
        "orchestrator.nan_guard.NonFiniteLossError: non-finite loss or gradient at epoch 2, step 9 (trial): gave up\n"
    )
    assert failure_reason(wrapped) == "orchestrator.nan_guard.NonFiniteLossError: non-finite loss or gradient at epoch 2, step 9 (trial): gave up"
    assert failure_reason(ValueError("one\ntwo")) == "two"


def test_fp32_attention_runs_sdpa_in_fp32_under_autocast():
    """Under bf16 autocast, attention normally runs in bf16; with ``fp32_attention`` its inputs are fp32
    (the result equals an fp32 computation to fp32 precision, then goes back to the caller's dtype)."""
    import torch.nn.functional as F

    from orchestrator.nan_guard import _Fp32Attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 8, generator=g) for _ in range(3))
    exact = F.scaled_dot_product_attention(q, k, v)
    seen = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.scaled_dot_product_attention:
                seen.append(args[0].dtype)
            return func(*args, **(kwargs or {}))

    with torch.autocast("cpu", dtype=torch.bfloat16), Spy(), _Fp32Attention("cpu"):  # the guard's mode runs first
        out = F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert seen == [torch.float32] and out.dtype == torch.bfloat16
    # bf16 inputs (8 mantissa bits) limit the match, not the attention arithmetic.
    assert torch.allclose(out.float(), exact, atol=5e-2)
