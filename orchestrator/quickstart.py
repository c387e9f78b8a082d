"""``prunetune quickstart``: the digits, a dense tiny ViT, and a DynamicViT + ToMe sweep, in one folder.

Everything goes under ``out``: the data (``data/digits``), Ray's run storage (``runs/``), the MLflow
store (``mlflow.db``) and the config it ran (``quickstart.yaml``, runnable with ``prunetune sweep``).
The dense model is trained once and reused by later runs. Sized for 2 CPU cores: well under 10
minutes, and the best trial above 90% top-1 on the digits' val split.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from methods import BackboneConfig, MeasureConfig
from methods.dynamicvit import DynamicViTConfig

from .config import DataConfig, ExperimentConfig, MethodArm, Objective, ResourcesConfig, SweepConfig, TrackingConfig, TrainConfig, to_yaml
from .data import write_digits
from .search_space import load_sweep_space
from .sweep import SweepOutcome, run_sweep

__all__ = ["quickstart_config", "digits_tiny_vit", "run_quickstart"]

_logger = logging.getLogger(__name__)


def digits_tiny_vit(data_path: str) -> ExperimentConfig:
    """A tiny ViT (4 blocks, 96 channels, 8x8 patches of 4 px) on the 32x32 digits: ~3 s an epoch on 2 CPU cores."""
    return ExperimentConfig(
        name="digits-dynamicvit",
        method="dynamicvit",
        # Three predictors, before blocks 1, 2, 3 of 4 (the paper: 3, 6, 9 of 12); paper defaults otherwise.
        method_config=DynamicViTConfig(pruning_loc=(1, 2, 3)),
        model=BackboneConfig(
            name="vit_tiny_patch16_224", img_size=32, patch_size=4, depth=4, embed_dim=96, num_heads=3, num_classes=10,
        ),
        # Digits are not mirror-symmetric and already centred: mild crops, no flips, no colour jitter.
        data=DataConfig(path=data_path, hflip=0.0, scale=(0.8, 1.0), ratio=(0.9, 1.1), color_jitter=None, crop_pct=1.0, loader_workers=0),
        # 27 epochs (95.6% val top-1 on 2 cores; 30, the earlier setting, 96.9-97.5% in 10% more time)
        pretrain=TrainConfig(epochs=27, batch_size=64, lr=2e-3, warmup_epochs=1, amp=False),
        train=TrainConfig(epochs=2, batch_size=64, lr=5e-4, warmup_epochs=0.5, amp=False),
        # One 2-thread worker: on 2 cores this beats two 1-thread gloo ranks (the model is tiny, so
        # per-step all-reduce costs more than it saves). Multi-worker DDP is one field away.
        resources=ResourcesConfig(num_workers=1, cpus_per_worker=2),
        measure=MeasureConfig(batch_size=64, warmup=3, iters=20, rounds=3),  # 3 warm-up passes: the rounds interleave
    )


def quickstart_config(out: Path, num_samples: int = 8) -> ExperimentConfig:
    """The quickstart's experiment: DynamicViT and ToMe on one front, everything under ``out``.

    Trials run one after another so that each one's timing runs on an otherwise idle machine.
    ToMe trials need no training (evaluate and measure: seconds), so they widen the front without
    growing the run time. The second objective is throughput relative to the dense backbone timed
    beside each model (``throughput_ratio``: robust to a noisy machine, unlike images/s): on a
    65-token model, batch-1 latency is dominated by per-op overhead that token pruning cannot remove
    (the predictors add some), while batched throughput shows the saving. Latency is still measured
    and recorded.
    """
    out = out.resolve()
    exp = digits_tiny_vit(str(out / "data" / "digits"))
    dynamicvit = {"name": "dynamicvit", "pruning_loc": [1, 2, 3]}
    return replace(
        exp,
        name="digits-dynamicvit-tome",
        sweep=SweepConfig(
            methods=(MethodArm(method=dynamicvit, search_space="dynamicvit"), MethodArm(method={"name": "tome"}, search_space="tome")),
            num_samples=num_samples, max_concurrent_trials=1, seed=0,
            objectives=(Objective("val_top1", "max"), Objective("throughput_ratio", "max")),
            # The papers' grids first: the training-free baseline, ToMe at two merge rates (seconds
            # each), then DynamicViT rho = .9/.8/.7 with its DeiT-S weights; then Optuna's own
            # picks, method included.
            points_to_evaluate=tuple({"method": "tome", "r": r, "inflect": 0.0} for r in (4, 8)) + tuple(
                {"method": "dynamicvit", "keep_ratio": rho, "ratio_weight": 2.0, "distill_weight": 0.5, "token_distill_weight": 0.5, "train.lr": 5e-4}
                for rho in (0.9, 0.8, 0.7)
            ),
        ),
        tracking=TrackingConfig(uri=f"sqlite:///{out / 'mlflow.db'}", experiment="prunetune-quickstart"),
        storage_path=str(out / "runs"),
    )


def run_quickstart(out: Path, num_samples: int = 8) -> SweepOutcome:
    out.mkdir(parents=True, exist_ok=True)
    exp = quickstart_config(out, num_samples)
    counts = write_digits(exp.data.path)
    _logger.info("[1/3] digits ready at %s (%d train / %d val)", exp.data.path, counts["train"], counts["val"])
    (out / "quickstart.yaml").write_text(to_yaml(exp))
    space = load_sweep_space(exp)
    _logger.info("[2/3] dense tiny ViT, then [3/3] a %d-trial DynamicViT + ToMe sweep (config: %s)", num_samples, out / "quickstart.yaml")
    return run_sweep(exp, space)
