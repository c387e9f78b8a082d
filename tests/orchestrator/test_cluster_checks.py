"""What ``prunetune sweep`` checks about the cluster and the storage before anything is recorded:
a trial that can never be placed, an unreachable cluster address, a bucket that is missing or
unusable (on a real S3 endpoint, moto's server), and SIGTERM (``ray job stop``) acting as Ctrl+C."""
from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from orchestrator import cluster, storage
from orchestrator.config import ResourcesConfig
from orchestrator.errors import UserError

BUCKET = "prunetune-checks"
SECRET = "checks-secret-7d2e"


def _res(workers: int, cpus: float = 1.0, gpus: float = 0.0, strategy: str = "PACK") -> ResourcesConfig:
    return ResourcesConfig(num_workers=workers, cpus_per_worker=cpus, gpus_per_worker=gpus, placement_strategy=strategy)


TWO_NODES = [{"CPU": 2.0, "memory": 8e9}, {"CPU": 2.0, "memory": 8e9}]


@pytest.mark.parametrize("workers, strategy, fits", [
    # 2 nodes x 2 CPUs, 1 CPU per worker: 4 workers in all, at most 2 on one node, at most 2 on distinct nodes.
    (2, "STRICT_SPREAD", True), (3, "STRICT_SPREAD", False),
    (2, "STRICT_PACK", True), (3, "STRICT_PACK", False),
    (4, "PACK", True), (5, "PACK", False),
    (4, "SPREAD", True), (5, "SPREAD", False),
])
def test_fit_by_placement_strategy(workers, strategy, fits):
    error = cluster.fit_error(_res(workers, strategy=strategy), False, TWO_NODES)
    assert (error is None) == fits, error


def test_refusal_gives_the_numbers():
    error = cluster.fit_error(_res(3, strategy="STRICT_SPREAD"), False, TWO_NODES)
    assert error == (
        "needs 3 workers (STRICT_SPREAD: each on a different node) of {CPU 1} each, "
        "but the cluster's 2 node(s) have [CPU 2; CPU 2]"
    )


def test_many_nodes_of_a_kind_are_counted():
    nodes = [{"CPU": 0.0}] + [{"CPU": 8.0, "GPU": 1.0}] * 5  # a KubeRay head (num-cpus 0) and 5 one-GPU nodes
    error = cluster.fit_error(_res(8, cpus=4, gpus=1), False, nodes)
    assert error == "needs 8 workers (PACK: anywhere) of {CPU 4, GPU 1} each, but the cluster's 6 node(s) have [CPU 0, GPU 0; 5 x CPU 8, GPU 1]"


def test_fractional_cpus_and_gpus():
    # 1.5 CPUs per worker: one per 2-CPU node (0.5 left over on each).
    assert cluster.fit_error(_res(2, cpus=1.5), False, TWO_NODES) is None
    assert cluster.fit_error(_res(3, cpus=1.5), False, TWO_NODES) is not None
    gpu_node = {"CPU": 8.0, "GPU": 1.0}
    assert "GPU 1" in cluster.fit_error(_res(2, cpus=4, gpus=1), False, [gpu_node])  # 8 CPUs would do; one GPU does not
    assert cluster.fit_error(_res(2, cpus=4, gpus=1), False, [gpu_node, gpu_node]) is None
    # A KubeRay head with num-cpus 0 holds no worker: 2 ranks spread need 2 GPU nodes.
    head = {"CPU": 0.0}
    assert cluster.fit_error(_res(2, cpus=4, gpus=1, strategy="STRICT_SPREAD"), False, [head, gpu_node]) is not None


def test_an_evaluating_trial_needs_one_workers_resources():
    assert cluster.fit_error(_res(8, cpus=2), True, TWO_NODES) is None  # num_workers does not matter
    error = cluster.fit_error(_res(1, cpus=4), True, TWO_NODES)
    assert error is not None and error.startswith("needs an evaluation of {CPU 4}")


def test_no_nodes():
    assert "no nodes" in cluster.fit_error(_res(1), False, [])


@pytest.mark.parametrize("address, expected", [
    ("127.0.0.1:6379", ("127.0.0.1", 6379)), ("head.ray.svc:6379", ("head.ray.svc", 6379)), ("[::1]:6379", ("::1", 6379)),
    ("auto", None), ("ray://head:10001", None), ("http://head:8265", None), ("head", None),
])
def test_gcs_address(address, expected):
    assert cluster._host_port(address) == expected


def test_unreachable_cluster_address_is_one_line_and_fast():
    import ray

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    start = time.monotonic()
    with pytest.raises(UserError) as e:
        cluster.connect(f"127.0.0.1:{port}")
    assert time.monotonic() - start < 10
    assert str(e.value).startswith(f"Ray cluster at 127.0.0.1:{port} is unreachable (ConnectionRefusedError")
    assert "\n" not in str(e.value) and not ray.is_initialized()


def test_sigterm_calls_the_current_sigint_handler():
    calls = []
    previous_int, previous_term = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))  # as Tune's graceful stop does
        cluster.stop_on_sigterm()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)  # the handler runs in the main thread at the next bytecode
        assert calls == [signal.SIGINT] and cluster.stop_requested()
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # no Python handler: a KeyboardInterrupt, as Ctrl+C outside Tune
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
    finally:
        signal.signal(signal.SIGINT, previous_int)
        signal.signal(signal.SIGTERM, previous_term)
        cluster._STOP.clear()


# ---------------------------------------------------------------------------------------------------
# The bucket


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "checks")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    client = boto3.client("s3")
    if BUCKET not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket=BUCKET)
    return s3_endpoint


def test_existing_bucket_and_local_paths_pass(s3, tmp_path):
    storage.check_bucket(f"s3://{BUCKET}/runs/prefix")  # the prefix need not exist yet
    storage.check_bucket(str(tmp_path / "runs"))


def test_missing_bucket(s3):
    with pytest.raises(UserError) as e:
        storage.check_bucket("s3://no-such-bucket/runs")
    assert str(e.value) == f"'s3://no-such-bucket/runs': bucket 'no-such-bucket' at {s3} does not exist"


def test_missing_credentials(s3, monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(UserError) as e:
        storage.check_bucket(f"s3://{BUCKET}/runs")
    assert str(e.value).startswith(f"'s3://{BUCKET}/runs': no S3 credentials in the environment")


def test_unreachable_endpoint(s3, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(UserError) as e:
        storage.check_bucket(f"s3://{BUCKET}/runs")
    message = str(e.value)
    assert message == f"'s3://{BUCKET}/runs': S3 endpoint http://127.0.0.1:{port} is unreachable (AWS_ENDPOINT_URL?)"
    assert SECRET not in message


def test_workers_that_never_start_are_retried_a_bounded_number_of_times(tmp_path):
    """Ray Train's own default retries a worker group that never starts forever (a trial then hangs
    its sweep); the trainer a trial gets stops after ``resources.worker_start_retries``."""
    from orchestrator import driver
    from orchestrator.config import ExperimentConfig

    exp = ExperimentConfig(resources=ResourcesConfig(worker_start_retries=3))
    trainer = driver.make_trainer(exp, "trial", "t", str(tmp_path), callbacks=[])
    assert trainer.run_config.failure_config.controller_failure_limit == 3
    default = driver.make_trainer(ExperimentConfig(), "trial", "t", str(tmp_path), callbacks=[])
    assert default.run_config.failure_config.controller_failure_limit == 10
    with pytest.raises(ValueError, match="worker_start_retries must be >= 0, got -1"):
        ResourcesConfig(worker_start_retries=-1)


def test_a_local_ray_names_its_dashboard_for_the_state_api(monkeypatch):
    """The Ray a sweep starts gets Ray's usual dashboard port when it is free, another free one when
    something holds it, and ``RAY_API_SERVER_ADDRESS`` (inherited by that Ray's processes) names it,
    replacing what an earlier local Ray of the same process left there."""
    monkeypatch.setenv(cluster.API_SERVER_ENV, "http://127.0.0.1:1")  # restored after the test
    with socket.socket() as held:
        try:
            held.bind(("127.0.0.1", cluster.DASHBOARD_PORT))
        except OSError:
            pytest.skip(f"port {cluster.DASHBOARD_PORT} is in use on this machine: the free case cannot be checked")
        held.listen()
        busy = cluster._named_dashboard()
        assert busy["dashboard_port"] not in (0, cluster.DASHBOARD_PORT)
        assert os.environ[cluster.API_SERVER_ENV] == f"http://127.0.0.1:{busy['dashboard_port']}"
    free = cluster._named_dashboard()
    assert free == {"dashboard_port": cluster.DASHBOARD_PORT, "dashboard_host": "127.0.0.1"}
    assert os.environ[cluster.API_SERVER_ENV] == "http://127.0.0.1:8265"


def test_a_local_ray_turns_ray_trains_preemption_watcher_off_by_the_variable_train_reads():
    """The name is Ray Train's own, and Train hands it from the driver to the controller that reads it."""
    from ray.train.v2._internal.constants import ENABLE_PREEMPTION_WATCHER_ENV_VAR, ENV_VARS_TO_PROPAGATE

    assert cluster.LOCAL_RAY_ENV[ENABLE_PREEMPTION_WATCHER_ENV_VAR] == "0"
    assert ENABLE_PREEMPTION_WATCHER_ENV_VAR in ENV_VARS_TO_PROPAGATE
