"""S3 end to end on a real S3 endpoint (moto's server): pretrained weights read from ``s3://``,
Ray Train checkpoints written to an ``s3://`` storage path, and a corrupt checkpoint refused."""
from __future__ import annotations

import io
from pathlib import Path

import boto3
import pytest
import torch
import yaml
from mlflow import MlflowClient

from methods import BackboneConfig, create_backbone

pytestmark = pytest.mark.integration

BUCKET = "prunetune-it"
MODEL = {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 4, "depth": 4, "embed_dim": 64, "num_heads": 2, "num_classes": 10}


@pytest.fixture(scope="module")
def s3_env(s3_endpoint):
    env = {
        "AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    client = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    weights = io.BytesIO()
    torch.save({"model": create_backbone(BackboneConfig(**MODEL)).state_dict()}, weights)  # DeiT release layout
    client.put_object(Bucket=BUCKET, Key="weights/dense.pt", Body=weights.getvalue())
    client.put_object(Bucket=BUCKET, Key="weights/corrupt.pt", Body=b"not a checkpoint at all")
    return env, client


def _config(tmp_path: Path, digits_dir: Path, pretrained: str) -> Path:
    cfg = {
        "name": "it-s3",
        "method": {"name": "dynamicvit", "pruning_loc": [1, 2, 3]},
        "model": {**MODEL, "pretrained": pretrained},
        "data": {"path": str(digits_dir), "hflip": 0.0, "color_jitter": None, "crop_pct": 1.0, "loader_workers": 0},
        "train": {"epochs": 1, "batch_size": 64, "amp": False},
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
        "sweep": {"search_space": "dynamicvit", "num_samples": 1},
        "measure": {"batch_size": 8, "warmup": 1, "iters": 3, "rounds": 1},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "it-s3"},
        "storage_path": f"s3://{BUCKET}/runs",
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_pretrained_weights_and_checkpoints_on_s3(tmp_path, digits_dir, s3_env, run_cli):
    env, client = s3_env
    env = {**env, "PRUNETUNE_CACHE": str(tmp_path / "s3-cache")}  # this test's own: the download really happens
    config = _config(tmp_path, digits_dir, f"s3://{BUCKET}/weights/dense.pt")
    proc = run_cli("sweep", str(config), "--name", "s3sweep", cwd=tmp_path, env=env, local_ray=True)  # its workers need env
    assert proc.returncode == 0, proc.stderr[-5000:]
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="runs/s3sweep/").get("Contents", [])]
    assert any(k.endswith("checkpoint_epoch_0000/state.pt") and "/trial_" in k for k in keys), keys
    mlflow = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = mlflow.get_experiment_by_name("it-s3")
    (trial,) = mlflow.search_runs([exp.experiment_id], filter_string="tags.`prunetune.role` = 'trial'")
    assert trial.info.status == "FINISHED"
    assert trial.data.params["model.pretrained"] == f"s3://{BUCKET}/weights/dense.pt"
    assert trial.data.tags["checkpoint_uri"].startswith(f"{BUCKET}/runs/s3sweep/trial_")
    assert "testing" not in str(trial.data.params)  # credentials never reach MLflow


def test_corrupt_checkpoint_on_s3_is_refused_before_anything_runs(tmp_path, digits_dir, s3_env, run_cli):
    env, _ = s3_env
    env = {**env, "PRUNETUNE_CACHE": str(tmp_path / "s3-cache")}
    config = _config(tmp_path, digits_dir, f"s3://{BUCKET}/weights/corrupt.pt")
    proc = run_cli("sweep", str(config), cwd=tmp_path, env=env, timeout=300, local_ray=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("prunetune: error:") and "corrupt.pt" in lines[-1], proc.stderr[-2000:]
    assert not (tmp_path / "mlflow.db").exists()
