"""Servers the integration tests start themselves on loopback, and how they end them: by the pids
they started (and those processes' descendants), never by a pattern over the machine (so never
``ray stop``, which would end every Ray on it)."""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
from proctree import descendants
from ports import free_port

__all__ = ["RayCluster", "end_tree", "free_port", "wait_http"]

BIN = Path(sys.executable).parent


def end_tree(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM ``proc`` and all its descendants (it started them), then SIGKILL what is left."""
    pids = descendants(proc.pid) | {proc.pid}
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    time.sleep(1)
    for pid in pids | descendants(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180, headers: dict | None = None) -> None:
    """Until ``url`` answers 200; fails at once with the log's tail if ``proc`` exits first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            if requests.get(url, timeout=3, headers=headers).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} did not answer in {timeout} s: {log.read_text()[-3000:]}")


class RayCluster:
    """Ray nodes on loopback (``ray start --head``, then ``ray start --address`` for each further
    node; ``--block`` so the processes stay under the ones the test started), 2 CPUs each, token
    auth on when ``token``. ``env`` is every node's environment (what its workers inherit)."""

    def __init__(self, env: dict[str, str], root: Path, nodes: int = 2, token: bool = True) -> None:
        self.token = secrets.token_hex(16) if token else ""
        self.env = {**env, **({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token} if token else {})}
        self.root, self.nodes = root, nodes
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        # Other Ray instances may run on this machine: Ray's own actors that look the cluster up
        # (Train's placement-group cleaner) must find this one.
        self.env["RAY_ADDRESS"] = self.address
        # Ray's memory monitor kills workers when the *machine* is near full, whoever fills it: on a
        # shared test machine that is other people's processes. The kernel's OOM killer remains.
        self.env["RAY_memory_monitor_refresh_ms"] = "0"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.procs: list[subprocess.Popen] = []
        self.temps: list[Path] = []
        self.names: list[str] = []

    def _ports(self) -> list[str]:
        return [
            "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
            "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
        ]

    def _start(self, name: str, args: list[str]) -> None:
        temp = Path(tempfile.mkdtemp(prefix=f"ray{name}-", dir="/tmp"))  # short: Ray's socket paths must stay < 108 bytes
        self.temps.append(temp)
        self.names.append(name)
        with open(self.root / f"{name}.log", "w") as log:
            self.procs.append(subprocess.Popen(
                [str(BIN / "ray"), "start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--temp-dir", str(temp),
                 "--disable-usage-stats", *self._ports(), *args],
                stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
            ))

    def start(self) -> None:
        self._start("head", ["--head", "--port", str(self.gcs_port), "--dashboard-host", "127.0.0.1",
                             "--dashboard-port", str(self.dashboard_port), "--ray-client-server-port", str(free_port()),
                             "--include-dashboard", "true"])
        wait_http(f"{self.dashboard}/api/version", self.procs[0], self.root / "head.log", headers=self.auth)
        for i in range(1, self.nodes):
            self._start(f"worker{i}", ["--address", self.address])
        deadline = time.time() + 180
        while self.alive_nodes() < self.nodes:
            for p, name in zip(self.procs, self.names):
                assert p.poll() is None, (self.root / f"{name}.log").read_text()[-3000:]
            assert time.time() < deadline, f"{self.nodes} Ray nodes did not come up in 180 s (logs in {self.root})"
            time.sleep(1)

    @property
    def client_env(self) -> dict[str, str]:
        """What a process needs in its environment to use this cluster (``ray.init()``, ``ray job``)."""
        return {k: v for k, v in self.env.items() if k in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def alive_nodes(self) -> int:
        try:
            r = requests.get(f"{self.dashboard}/nodes?view=summary", headers=self.auth, timeout=5)
            return sum(n["raylet"]["state"] == "ALIVE" for n in r.json()["data"]["summary"])
        except (requests.RequestException, KeyError, ValueError):
            return 0

    def stop(self) -> None:
        """SIGKILL each node's processes, then its ``ray start --block``: nothing of a test cluster
        needs a graceful end (its temp dir goes too), and ``ray start``'s own graceful stop waited
        30 s per node once a job had run on it."""
        for p in reversed(self.procs):
            for _ in range(3):  # while the parent lives its tree is findable; a process may spawn one more
                tree = descendants(p.pid)
                for pid in tree:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                if not tree:
                    break
            p.kill()
            p.wait(timeout=30)
        for t in self.temps:
            shutil.rmtree(t, ignore_errors=True)

    def ray(self, *args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        """The ``ray`` CLI against this cluster's dashboard (``ray job ...``), with the cluster's token."""
        return subprocess.run([str(BIN / "ray"), *args], env={**self.env, **(env or {})}, cwd=cwd,
                              capture_output=True, text=True, timeout=timeout)
