"""A sweep submitted with ``ray job submit`` to a real two-node Ray cluster on loopback (token auth
on), with its checkpoints in S3 (moto's server) and its records on a real ``mlflow server`` whose
backend store is a real PostgreSQL and whose artifacts go to the same S3 endpoint; then
``ray job stop`` mid-sweep and a second submission that resumes it; then bad input, refused in one
line before anything is recorded.

Every server here is started by this module on free loopback ports and ended in ``finally`` by the
pids it started (never ``ray stop``, which would end every Ray on the machine).
"""
from __future__ import annotations

import glob
import io
import json
import os
import re
import secrets
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

import boto3
import pytest
from services import RayCluster, end_tree as _end, free_port as _free_port, wait_http as _wait_http
import requests
import torch
import yaml
from mlflow import MlflowClient

from methods import BackboneConfig, create_backbone

# Its own Ray, PostgreSQL and MLflow: an xdist group of its own, beside the other integration tests (tests/conftest.py).
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("cluster")]

BUCKET = "prunetune-cluster"
EXPERIMENT = "it-cluster"
MODEL = {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 4, "depth": 4, "embed_dim": 64, "num_heads": 2, "num_classes": 10}
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "clusterkeyid", "AWS_SECRET_ACCESS_KEY": "cluster-secret-4f1c9a", "AWS_DEFAULT_REGION": "us-east-1"}
BIN = Path(sys.executable).parent


#: What would point a process here at another cluster, tracking server or S3 cache than this module's own.
_FOREIGN = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "PRUNETUNE_CACHE", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
            "RAY_AUTH_TOKEN_PATH", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT_URL_S3", "AWS_PROFILE")


def clean_env(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k not in _FOREIGN}, **extra}


# ---------------------------------------------------------------------------------------------------
# PostgreSQL, MLflow, S3


def _pg_bin() -> Path | None:
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(d, "initdb").is_file() and Path(d, "pg_ctl").is_file():
            return Path(d)
    return None


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server in a temporary data folder on a free port (as the ``postgres`` user when
    this runs as root, which initdb refuses); yields its SQLAlchemy URI for MLflow."""
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin (apt-get install -y postgresql)")
    user = "postgres" if os.geteuid() == 0 else None
    root = Path(tempfile.mkdtemp(prefix="pg-", dir="/tmp"))
    data, port = root / "data", _free_port()
    if user:
        shutil.chown(root, user)
    as_user = {"user": user} if user else {}
    subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", "mlflow", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True, **as_user)
    started = False
    try:
        subprocess.run(
            [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "pg.log"), "-w", "-t", "60", "start",
             "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1"],
            check=True, capture_output=True, **as_user,
        )
        started = True
        subprocess.run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "mlflow"], check=True, capture_output=True)
        yield f"postgresql+psycopg2://mlflow@127.0.0.1:{port}/mlflow"
    finally:
        if started:
            subprocess.run([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True, **as_user)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def s3(s3_endpoint):
    """The moto S3 endpoint with this module's bucket and dense weights in it."""
    client = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    weights = io.BytesIO()
    torch.manual_seed(0)
    torch.save({"model": create_backbone(BackboneConfig(**MODEL)).state_dict()}, weights)
    client.put_object(Bucket=BUCKET, Key="weights/dense.pt", Body=weights.getvalue())
    return s3_endpoint, client


@pytest.fixture(scope="module")
def mlflow_pg(postgres, s3, tmp_path_factory):
    """``mlflow server``: runs in PostgreSQL, artifacts proxied to ``s3://BUCKET/mlflow-artifacts``."""
    endpoint, _ = s3
    root = tmp_path_factory.mktemp("mlflow-pg")
    port, log = _free_port(), root / "server.log"
    env = clean_env(**S3_CREDENTIALS, MLFLOW_S3_ENDPOINT_URL=endpoint)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", postgres, "--artifacts-destination", f"s3://{BUCKET}/mlflow-artifacts"],
            stdout=out, stderr=subprocess.STDOUT, cwd=root, env=env, start_new_session=True,
        )
    try:
        uri = f"http://127.0.0.1:{port}"
        _wait_http(f"{uri}/health", proc, log)
        yield uri
    finally:
        _end(proc)


# ---------------------------------------------------------------------------------------------------
# The Ray cluster


@pytest.fixture(scope="module")
def ray_cluster(s3, tmp_path_factory):
    endpoint, _ = s3
    root = tmp_path_factory.mktemp("ray-cluster")
    # The nodes' environment, as a Kubernetes Secret and ConfigMap would give it: S3 endpoint and
    # credentials. The jobs' runtime env carries none of them.
    env = clean_env(
        **S3_CREDENTIALS, AWS_ENDPOINT_URL=endpoint, PRUNETUNE_CACHE=str(root / "s3-cache"),
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    cluster = RayCluster(env, root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()



# ---------------------------------------------------------------------------------------------------
# Jobs


def _config(job_dir: Path, digits_dir: Path, name: str = "sweep.yaml", **overrides) -> str:
    """A 2-trial DynamicViT sweep (1 epoch, 2 DDP workers per trial, one per node), written into the
    job's working dir; returns its name there."""
    cfg = {
        "name": "it-cluster",
        "method": {"name": "dynamicvit", "pruning_loc": [1, 2, 3]},
        "model": {**MODEL, "pretrained": f"s3://{BUCKET}/weights/dense.pt"},
        "data": {"path": str(digits_dir), "hflip": 0.0, "color_jitter": None, "crop_pct": 1.0, "loader_workers": 0},
        "train": {"epochs": 1, "batch_size": 64, "amp": False},
        "resources": {"num_workers": 2, "cpus_per_worker": 1, "placement_strategy": "STRICT_SPREAD"},
        "sweep": {"search_space": "space.yaml", "num_samples": 2, "max_concurrent_trials": 1, "seed": 0},
        "measure": {"batch_size": 8, "warmup": 1, "iters": 3, "rounds": 1},
        "tracking": {"experiment": EXPERIMENT},
        "storage_path": f"s3://{BUCKET}/runs",
        **overrides,
    }
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / "space.yaml").write_text(yaml.safe_dump({
        "keep_ratio": {"distribution": "uniform", "low": 0.5, "high": 0.9},
        "train.lr": {"distribution": "loguniform", "low": 5.0e-4, "high": 2.0e-3},
    }))
    (job_dir / name).write_text(yaml.safe_dump(cfg))
    return name


#: The job's runtime env: no credentials (the dashboard shows it), only how long ``ray job stop``
#: lets the sweep end gracefully (Ray's default is 3 s, then SIGKILL).
RUNTIME_ENV = json.dumps({"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "180"}})


def _submit(cluster: RayCluster, job_dir: Path, submission_id: str, *args: str, wait: bool = True, timeout: float = 900):
    """``ray job submit --working-dir JOB_DIR -- prunetune sweep ARGS`` (the README's command)."""
    return cluster.ray(
        "job", "submit", "--address", cluster.dashboard, "--working-dir", ".", "--submission-id", submission_id,
        "--runtime-env-json", RUNTIME_ENV, "--log-style", "record", *([] if wait else ["--no-wait"]),
        "--", "prunetune", "sweep", *args, cwd=job_dir, timeout=timeout,
    )


def _job(cluster: RayCluster, submission_id: str) -> dict:
    r = requests.get(f"{cluster.dashboard}/api/jobs/{submission_id}", headers=cluster.auth, timeout=10)
    r.raise_for_status()
    return r.json()


def _logs(cluster: RayCluster, submission_id: str) -> str:
    r = requests.get(f"{cluster.dashboard}/api/jobs/{submission_id}/logs", headers=cluster.auth, timeout=10)
    r.raise_for_status()
    return r.json()["logs"]


def _wait_job(cluster: RayCluster, submission_id: str, timeout: float = 300) -> str:
    deadline = time.time() + timeout
    while (status := _job(cluster, submission_id)["status"]) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.time() < deadline, f"job {submission_id} still {status}: {_logs(cluster, submission_id)[-3000:]}"
        time.sleep(2)
    return status


def _runs(client: MlflowClient, sweep: str, role: str):
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return []
    return client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`prunetune.role` = '{role}' AND tags.`prunetune.sweep` = '{sweep}'",
    )


def _keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.fixture(scope="module")
def submitted(ray_cluster, mlflow_pg, digits_dir, tmp_path_factory, cores_to_itself):
    """The 2-trial sweep as a user runs it on a cluster: submitted with ``ray job submit``, stopped
    with ``ray job stop`` once its first trial finished, and resumed by a second submission that
    finishes it. One sweep serves the placement, storage, credential and stop/resume tests. Never
    beside a sweep that reads its timings (``cores_to_itself``)."""
    with cores_to_itself():
        return _submit_stop_resume(ray_cluster, mlflow_pg, digits_dir, tmp_path_factory.mktemp("job"))


def _submit_stop_resume(ray_cluster, mlflow_pg: str, digits_dir: Path, job_dir: Path):
    config = _config(job_dir, digits_dir)
    client = MlflowClient(mlflow_pg)
    start = time.time()
    proc = _submit(ray_cluster, job_dir, "it-sweep-1", config, "--name", "cl-sweep", "--tracking-uri", mlflow_pg, wait=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Stop once the first trial finished and Tune started the second (one trial at a time).
    deadline = time.time() + 600
    while not (len(trials := _runs(client, "cl-sweep", "trial")) == 2 and any(t.info.status == "FINISHED" for t in trials)):
        assert _job(ray_cluster, "it-sweep-1")["status"] in ("PENDING", "RUNNING"), _logs(ray_cluster, "it-sweep-1")[-5000:]
        assert time.time() < deadline, _logs(ray_cluster, "it-sweep-1")[-5000:]
        time.sleep(1)
    stop = ray_cluster.ray("job", "stop", "--address", ray_cluster.dashboard, "it-sweep-1", timeout=300)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    stopped_status = _wait_job(ray_cluster, "it-sweep-1")
    (parent,) = _runs(client, "cl-sweep", "sweep")
    (done,) = [t for t in _runs(client, "cl-sweep", "trial") if t.info.status == "FINISHED"]
    stopped = {
        "status": stopped_status, "logs": _logs(ray_cluster, "it-sweep-1"), "parent": parent, "done": done,
        "history": [(m.step, m.value, m.timestamp) for m in client.get_metric_history(done.info.run_id, "val_top1")],
    }
    resume = _submit(ray_cluster, job_dir, "it-sweep-2", config, "--resume", "cl-sweep", "--tracking-uri", mlflow_pg)
    logs = _logs(ray_cluster, "it-sweep-2")
    assert resume.returncode == 0, resume.stdout[-3000:] + resume.stderr[-3000:] + logs[-5000:]
    print(f"ray job submit, stop and resume of a 2-trial x 2-worker sweep took {time.time() - start:.0f} s")
    return resume, logs, client, stopped


def test_submitted_sweep_succeeds_on_two_nodes(ray_cluster, submitted, s3):
    proc, logs, client, _ = submitted
    assert _job(ray_cluster, "it-sweep-2")["status"] == "SUCCEEDED"
    assert "2 trials, 0 failed" in logs
    (parent,) = _runs(client, "cl-sweep", "sweep")
    assert parent.info.status == "FINISHED"
    trials = _runs(client, "cl-sweep", "trial")
    assert len(trials) == 2 and all(t.info.status == "FINISHED" for t in trials)
    for t in trials:
        ranks = json.loads(t.data.tags["prunetune.ranks"])
        assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
        assert ranks[0]["node_id"] != ranks[1]["node_id"], "STRICT_SPREAD: one DDP worker on each node"
        assert t.data.tags["device"] == ranks[0]["device"]
        assert {"val_top1", "latency_ms", "speedup"} <= set(t.data.metrics)
        assert t.data.tags["pareto"] in ("true", "false")
        assert t.data.tags["checkpoint_uri"].startswith(f"{BUCKET}/runs/cl-sweep/trial_")
    # The front (a 1-epoch model may not beat the dense reference run, which is on the front too).
    (reference,) = [r for r in client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
                    if r.data.tags.get("prunetune.role") == "reference"]
    assert any(r.data.tags["pareto"] == "true" for r in [*trials, reference])


def test_checkpoints_and_artifacts_are_in_the_bucket(submitted, s3):
    _, _, client, _ = submitted
    _, s3_client = s3
    keys = _keys(s3_client, "runs/cl-sweep/")
    trial_dirs = {k.split("/")[2] for k in keys if k.endswith("checkpoint_epoch_0000/state.pt")}
    assert len(trial_dirs) == 2 and all(d.startswith("trial_") for d in trial_dirs), keys[:20]
    (parent,) = _runs(client, "cl-sweep", "sweep")
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied: the server holds the S3 credentials
    assert "pareto_front.png" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    stored = _keys(s3_client, "mlflow-artifacts/")
    assert any(k.endswith(f"{parent.info.run_id}/artifacts/pareto_front.png") for k in stored), stored[:20]


def test_no_credential_reaches_logs_or_mlflow(ray_cluster, submitted):
    proc, logs, client, stopped = submitted
    secret = S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]
    for text in (logs, stopped["logs"], proc.stdout, proc.stderr):
        assert secret not in text and ray_cluster.token not in text
    for run in _runs(client, "cl-sweep", "sweep") + _runs(client, "cl-sweep", "trial"):
        assert secret not in json.dumps(run.data.params) + json.dumps(run.data.tags)
    for job in ("it-sweep-1", "it-sweep-2"):
        assert secret not in json.dumps(_job(ray_cluster, job))  # the job's runtime env, as the dashboard shows it


def test_ray_job_stop_ends_the_sweep_resumably(submitted):
    """``ray job stop`` ended the first submission as Ctrl+C does (recorded, interrupted); the second
    submission's ``--resume`` finished the sweep without running the finished trial again."""
    _, logs, client, stopped = submitted
    assert stopped["status"] == "STOPPED"
    assert "SIGTERM received" in stopped["logs"] and "(interrupted)" in stopped["logs"], stopped["logs"][-5000:]
    parent, done = stopped["parent"], stopped["done"]
    assert parent.info.status == "KILLED" and parent.data.tags["prunetune.interrupted"] == "true", stopped["logs"][-3000:]
    trials = _runs(client, "cl-sweep", "trial")
    assert len(trials) == 2 and all(t.info.status == "FINISHED" for t in trials)
    again = client.get_run(done.info.run_id)
    assert again.info.end_time == done.info.end_time, "a finished trial is never run again"
    assert [(m.step, m.value, m.timestamp) for m in client.get_metric_history(done.info.run_id, "val_top1")] == stopped["history"]
    assert f"trial {done.data.tags['prunetune.trial_id']} (dynamicvit) started" not in logs
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED" and "prunetune.interrupted" not in parent.data.tags


# ---------------------------------------------------------------------------------------------------
# Bad input: one line, a non-zero exit, nothing recorded, no credential printed


def _prunetune(cluster: RayCluster, job_dir: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``prunetune sweep ARGS`` from this machine as a client of the cluster (``--address``), with the nodes'
    environment changed by ``env`` (None: removed)."""
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", "sweep", *args], cwd=job_dir, capture_output=True, text=True,
                          timeout=300, env={k: v for k, v in {**cluster.env, **(env or {})}.items() if v is not None})


def _one_line_error(proc: subprocess.CompletedProcess, *secrets_: str) -> str:
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith("prunetune: error: "), proc.stdout[-2000:] + proc.stderr[-3000:]
    for secret in secrets_:
        assert secret not in proc.stdout + proc.stderr
    return last.removeprefix("prunetune: error: ")


def _nothing_recorded(db: Path) -> bool:
    """No experiment or run in the sqlite store ``db`` (the CLI may have created its empty schema)."""
    if not db.exists():
        return True
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
        return con.execute("SELECT count(*) FROM runs").fetchone()[0] == 0 and \
            con.execute("SELECT count(*) FROM experiments WHERE name != 'Default'").fetchone()[0] == 0


def test_unreachable_cluster_address(ray_cluster, digits_dir, tmp_path):
    config = _config(tmp_path, digits_dir)
    nowhere = _free_port()
    sub = ray_cluster.ray("job", "submit", "--address", f"http://127.0.0.1:{nowhere}", "--", "prunetune", "sweep", config, cwd=tmp_path)
    assert sub.returncode != 0 and ray_cluster.token not in sub.stdout + sub.stderr
    proc = _prunetune(ray_cluster, tmp_path, config, "--address", f"127.0.0.1:{nowhere}", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db")
    message = _one_line_error(proc, ray_cluster.token, S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
    assert message.startswith(f"Ray cluster at 127.0.0.1:{nowhere} is unreachable (ConnectionRefusedError")
    assert _nothing_recorded(tmp_path / "mlflow.db")


def test_wrong_token(ray_cluster, digits_dir, tmp_path):
    config = _config(tmp_path, digits_dir)
    wrong = {"RAY_AUTH_TOKEN": "not-the-token-" + secrets.token_hex(8)}
    sub = ray_cluster.ray("job", "submit", "--address", ray_cluster.dashboard, "--", "prunetune", "sweep", config, cwd=tmp_path, env=wrong)
    assert sub.returncode != 0 and "token" in (sub.stdout + sub.stderr).lower(), sub.stdout[-2000:] + sub.stderr[-2000:]
    assert ray_cluster.token not in sub.stdout + sub.stderr and wrong["RAY_AUTH_TOKEN"] not in sub.stdout + sub.stderr
    proc = _prunetune(ray_cluster, tmp_path, config, "--address", ray_cluster.address, "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", env=wrong)
    message = _one_line_error(proc, ray_cluster.token, wrong["RAY_AUTH_TOKEN"])
    assert message.startswith(f"Ray cluster at {ray_cluster.address} refused this process's token (RAY_AUTH_MODE=token;")
    assert _nothing_recorded(tmp_path / "mlflow.db")


def test_a_trial_that_can_never_fit_is_refused_with_the_numbers(ray_cluster, digits_dir, tmp_path):
    config = _config(tmp_path, digits_dir)
    proc = _prunetune(ray_cluster, tmp_path, config, "--address", ray_cluster.address, "--set", "resources.num_workers=3",
                      "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db")
    message = _one_line_error(proc, ray_cluster.token)
    assert message == (
        "a dynamicvit trial can never start: it needs 3 workers (STRICT_SPREAD: each on a different node) of {CPU 1} each, "
        "but the cluster's 2 node(s) have [CPU 2; CPU 2] (resources.* in the config)"
    )
    assert _nothing_recorded(tmp_path / "mlflow.db")


@pytest.mark.parametrize("case", ["missing bucket", "missing credentials"])
def test_storage_refused_before_anything_runs(ray_cluster, digits_dir, tmp_path, case):
    if case == "missing bucket":
        config = _config(tmp_path, digits_dir, storage_path="s3://no-such-bucket/runs")
        env, expected = {}, f"'s3://no-such-bucket/runs': bucket 'no-such-bucket' at {ray_cluster.env['AWS_ENDPOINT_URL']} does not exist"
    else:
        config = _config(tmp_path, digits_dir)
        env = {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
               "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_EC2_METADATA_DISABLED": "true"}
        expected = f"'s3://{BUCKET}/runs': no S3 credentials in the environment"
    proc = _prunetune(ray_cluster, tmp_path, config, "--address", ray_cluster.address, "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", env=env)
    assert _one_line_error(proc, S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]).startswith(expected)
    assert _nothing_recorded(tmp_path / "mlflow.db")


def test_tracking_server_unreachable_from_the_cluster(ray_cluster, mlflow_pg, digits_dir, tmp_path):
    # The job's driver runs on the head: "localhost" there is not the submitter's machine. Here,
    # nothing listens on that port, so the job fails in one line before anything is recorded.
    config = _config(tmp_path, digits_dir)
    nowhere = f"http://127.0.0.1:{_free_port()}"
    proc = _submit(ray_cluster, tmp_path, "it-bad-tracking", config, "--name", "cl-bad", "--tracking-uri", nowhere, timeout=300)
    assert proc.returncode != 0
    assert _job(ray_cluster, "it-bad-tracking")["status"] == "FAILED"
    lines = _logs(ray_cluster, "it-bad-tracking").strip().splitlines()
    assert lines[-1] == f"prunetune: error: tracking server {nowhere!r} is unreachable (ConnectionError)", lines[-20:]
    assert not _runs(MlflowClient(mlflow_pg), "cl-bad", "sweep")
    # Every other node is asked too (a trial logs from there): the check runs on the worker node.
    script = (
        "import ray; from orchestrator import cluster; from orchestrator.errors import UserError\n"
        "ray.init()\n"
        f"try:\n    cluster.check_from_nodes({nowhere!r}, 's3://{BUCKET}/runs')\n"
        "except UserError as e:\n    print('REFUSED', e)\n"
        f"cluster.check_from_nodes({mlflow_pg!r}, 's3://{BUCKET}/runs'); print('REACHABLE')\n"
    )
    (tmp_path / "check.py").write_text(script)
    job = ray_cluster.ray("job", "submit", "--address", ray_cluster.dashboard, "--working-dir", ".", "--", "python", "check.py", cwd=tmp_path, timeout=300)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    # (Ray names the node by the machine's address, not 127.0.0.1.)
    assert re.search(rf"REFUSED from Ray node [\d.]+: tracking server {re.escape(repr(nowhere))} is unreachable \(ConnectionError\)", job.stdout), job.stdout[-3000:]
    assert "REACHABLE" in job.stdout
