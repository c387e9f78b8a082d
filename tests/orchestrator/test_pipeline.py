"""Pipeline files without running them: the shipped Evo-ViT DeiT-B recipe is the authors' (methods.md,
Evo-ViT (d)), every file a pipeline names exists, bad pipelines fail in one line, and a resume over
changed inputs is refused with the keys that differ."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator import pipeline as pl
from orchestrator.cli import main
from orchestrator.errors import ConfigError, UserError

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "pipelines" / "evovit_deit_b.yaml"
TWIN = REPO / "pipelines" / "digits_evovit.yaml"


def test_deit_b_recipe_is_the_authors_workaround():
    pipe = pl.load_pipeline(RECIPE)
    assert [(s.name, s.kind, s.from_) for s in pipe.stages] == [("warmup", "train", None), ("main", "train", "warmup")]
    for s in pipe.stages:
        assert (RECIPE.parent / s.config).is_file()
    warm, main_ = (pl.stage_experiment(pipe, s) for s in pipe.stages)
    assert pipe.storage_path.startswith("s3://") and warm.storage_path.startswith("s3://")
    for exp in (warm, main_):
        assert exp.method == "evovit" and exp.model.name == "deit_base_patch16_224" and exp.model.num_classes == 1000
        assert exp.train.batch_size == 128  # per GPU: the NaN workaround
        assert (exp.resources.num_workers, exp.resources.gpus_per_worker) == (8, 1)
        assert exp.train.lr == pytest.approx(5e-4 * 128 * 8 / 512)  # lr 5e-4 * global batch / 512
        assert (exp.train.warmup_epochs, exp.train.weight_decay, exp.model.drop_path_rate) == (5, 0.05, 0.1)
        assert exp.method_config.prune_ratio == 0.5 and exp.method_config.prune_location == 4
        assert exp.method_config.layerwise_epochs == 200  # layer-wise for the first 200 of 300 epochs
        assert exp.train.checkpoint_every_steps > 0
    # 9 warm-up epochs on the 300-epoch schedule, then the main stage resumes them to 300 (291 more)
    assert (warm.train.epochs, warm.train.schedule_epochs) == (9, 300)
    assert main_.train.epochs == 300 and (main_.train.schedule_epochs or main_.train.epochs) == 300
    assert pl.stage_experiment(pipe, pipe.stages[1], "s3://x/warmup/checkpoint_epoch_0008").train.init_checkpoint == "s3://x/warmup/checkpoint_epoch_0008"


def test_digits_twin_mirrors_the_recipe():
    pipe, recipe = pl.load_pipeline(TWIN), pl.load_pipeline(RECIPE)
    assert [(s.name, s.kind, s.from_) for s in pipe.stages] == [(s.name, s.kind, s.from_) for s in recipe.stages]
    warm, main_ = (pl.stage_experiment(pipe, s) for s in pipe.stages)
    assert warm.method == main_.method == "evovit"
    assert (warm.train.epochs, warm.train.schedule_epochs, main_.train.epochs) == (1, 2, 2)
    assert warm.resources.num_workers == 2 and warm.resources.gpus_per_worker == 0


def _write(tmp_path: Path, stages: list[dict]) -> Path:
    import yaml

    exp = (REPO / "pipelines" / "experiments" / "digits_evovit.yaml").read_text()
    (tmp_path / "exp.yaml").write_text(exp)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "p", "storage_path": "runs", "stages": stages}))
    return path


def test_bad_pipelines_fail_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="from 'later' must name an earlier stage"):
        pl.load_pipeline(_write(tmp_path, [{"name": "a", "config": "exp.yaml", "from": "later"}, {"name": "later", "config": "exp.yaml"}]))
    with pytest.raises(ConfigError, match="stage a: config file .*nope.yaml.* does not exist"):
        pl.load_pipeline(_write(tmp_path, [{"name": "a", "config": "nope.yaml"}]))
    with pytest.raises(ConfigError, match="stage a: .*unknown parameter 'train.nope'"):
        pl.load_pipeline(_write(tmp_path, [{"name": "a", "config": "exp.yaml", "set": {"train.nope": 1}}]))
    with pytest.raises(ConfigError, match="named twice"):
        pl.load_pipeline(_write(tmp_path, [{"name": "a", "config": "exp.yaml"}, {"name": "a", "config": "exp.yaml"}]))
    with pytest.raises(ConfigError, match="stage s: a sweep starts from a dense train stage's backbone, but a trains evovit"):
        pl.load_pipeline(_write(tmp_path, [{"name": "a", "config": "exp.yaml"}, {"name": "s", "kind": "sweep", "config": "exp.yaml", "from": "a"}]))
    (tmp_path / "dense.yaml").write_text((tmp_path / "exp.yaml").read_text().replace("method: {name: evovit, prune_ratio: 0.5, prune_location: 2, layerwise_epochs: 1}", "method: dense"))
    with pytest.raises(ConfigError, match="stage b: stage a's checkpoint is of method dense on backbone vit_tiny_patch16_224, but this run is method evovit"):
        pl.load_pipeline(_write(tmp_path, [{"name": "a", "config": "dense.yaml"}, {"name": "b", "config": "exp.yaml", "from": "a"}]))
    assert main(["pipeline", str(tmp_path / "missing.yaml")]) == 2


def _manifest(pipe, stage, inputs, status="finished"):
    folder = Path(pipe.folder, "manifests")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stage}.json").write_text(json.dumps({"stage": stage, "status": status, "inputs": inputs, "upstream_checkpoint": None}))


def test_recorded_stages_need_resume_and_changed_inputs_are_refused(tmp_path):
    pipe = pl.load_pipeline(_write(tmp_path, [{"name": "a", "config": "exp.yaml"}]))
    inputs = pl.stage_inputs(pl.stage_experiment(pipe, pipe.stages[0]))
    _manifest(pipe, "a", inputs)
    with pytest.raises(UserError, match="has stages recorded .* continue it with --resume"):
        pl._check_resume(pipe, resume=False)
    assert pl._check_resume(pipe, resume=True)["a"]["status"] == "finished"
    _manifest(pipe, "a", {**inputs, "train.lr": "0.0005", "prune_ratio": "0.7"})
    with pytest.raises(UserError, match=r"stage a: its inputs changed since it ran \(prune_ratio: 0.7 -> 0.5; train.lr: 0.0005 -> 0.001\)"):
        pl._check_resume(pipe, resume=True)


def test_where_a_stage_is_recorded_is_not_one_of_its_inputs(tmp_path):
    pipe = pl.load_pipeline(_write(tmp_path, [{"name": "a", "config": "exp.yaml"}]))
    exp = pl.stage_experiment(pipe, pipe.stages[0])
    inputs = pl.stage_inputs(exp)
    assert "train.lr" in inputs and "prune_ratio" in inputs
    assert not any(k.startswith("tracking.") or k == "storage_path" for k in inputs)
    assert pl.identity(inputs, "a" * 64) != pl.identity(inputs, "b" * 64)  # the upstream checkpoint is an input
