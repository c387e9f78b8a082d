"""Real services on loopback for the integration tests: one Ray and one MLflow tracking server shared
by the sweeps of this package, digits on disk."""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytest
import requests

from orchestrator.data import write_digits
from orchestrator.cluster import LOCAL_RAY_ENV
from services import RayCluster


def _mlflow_bin() -> str:
    return shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, port_factory):
    """``mlflow server`` with a sqlite backend and proxied artifacts, on a free loopback port."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = port_factory()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [_mlflow_bin(), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, cwd=root,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
        try:
            if requests.get(f"{uri}/health", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            time.sleep(1)
    else:
        proc.kill()
        raise RuntimeError("mlflow server did not come up in 120 s")
    yield uri
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "digits"
    write_digits(out)
    return out


@pytest.fixture(scope="session")
def cores_to_itself(tmp_path_factory, request):
    """``with cores_to_itself(): ...``: no other xdist worker's cores-hungry block (another sweep that
    starts Ray workers) runs meanwhile. Under ``-n 2`` (CI) the two-node cluster's tests run on the
    other worker beside this package's sweeps (``tests/conftest.py``); a sweep whose assertions read
    its timings (the dense model timed beside itself) must not share the 2 cores with another sweep:
    on a machine with three times more runnable threads than cores, a 1-ms forward took 2.4, 10.8 or
    420 ms by the luck of the scheduler, and a dense-beside-dense speed-up of 1.34 was recorded.
    An exclusive ``flock`` on a file in the run's base directory, which every worker sees; a no-op
    without xdist (one process runs everything in turn)."""
    if not hasattr(request.config, "workerinput"):  # not an xdist worker
        return nullcontext
    path = tmp_path_factory.getbasetemp().parent / "cores.lock"

    @contextmanager
    def hold():
        with open(path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, whatever happens inside
            yield

    return hold


#: Variables that would point a test's sweep at a real cluster or tracking server instead of its own.
_FOREIGN = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "PRUNETUNE_CACHE")


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without what would reach outside the test, plus ``extra``."""
    return {**{k: v for k, v in os.environ.items() if k not in _FOREIGN}, **extra}


@pytest.fixture(scope="package")
def shared_ray(tmp_path_factory):
    """One single-node Ray (2 CPUs, dashboard on, token auth as Ray 2.60 has it by default) for the
    sweeps of this package: a sweep that starts a local Ray of its own spends 8-10 s starting and
    stopping it on 2 cores. Its node gets the settings a sweep gives a Ray it starts
    (``orchestrator.cluster.LOCAL_RAY_ENV``), and Ray's memory monitor is off (on a shared test machine it counts
    other people's processes; the kernel's OOM killer remains). Idle, it takes about 3.6% of 2 cores."""
    cluster = RayCluster(
        clean_env(**LOCAL_RAY_ENV), tmp_path_factory.mktemp("shared-ray"),
        nodes=1,
    )
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="package")
def run_cli(shared_ray):
    """``run_cli(*args, cwd=..., timeout=900, env=None, local_ray=False)``: ``prunetune ARGS`` in a
    subprocess, output captured, on the package's shared Ray; with ``local_ray``, on a Ray of its own
    that it starts (what a sweep without a cluster does; needed where the sweep's workers must see
    ``env``, which reaches only the processes under the CLI)."""

    def run(*args: str, cwd: Path, timeout: float = 900, env: dict | None = None, local_ray: bool = False):
        ray = {} if local_ray else shared_ray.client_env
        return subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
            env=clean_env(**{**ray, **(env or {})}),  # a test's env wins
        )

    return run


@pytest.fixture
def cli_env() -> dict[str, str]:
    """The environment for a ``prunetune`` process a test starts itself (``clean_env``): a Ray of its own."""
    return clean_env()
