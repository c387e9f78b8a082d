"""The Ray cluster a sweep runs on: connecting to it, whether a trial can ever fit it, and checks run
from its nodes, all before anything is recorded.

- ``connect``: ``ray.init`` on the given address (``--address``, ``RAY_ADDRESS``, or the cluster a
  ``ray job submit`` job runs on), with an unreachable address or a refused token turned into one line.
- ``check_fits``: every arm's trial (its DDP workers under its placement strategy, or its in-actor
  evaluation) against the nodes the cluster has, or may scale up to under an autoscaler; a trial
  that could never be placed would stay PENDING forever, so the sweep is refused with the numbers.
- ``check_from_nodes``: the tracking store and the storage path, checked from every other node (a
  trial runs there, with that node's network and credentials), as a zero-CPU task per node.
- ``stop_on_sigterm``: ``ray job stop`` sends SIGTERM; it ends the sweep as Ctrl+C does.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import socket
import time
from typing import Any, Mapping, Sequence

import ray

from .config import ResourcesConfig
from .errors import UserError

__all__ = ["connect", "check_fits", "fit_error", "check_from_nodes", "stop_on_sigterm", "stop_requested", "worker_bundle"]

_logger = logging.getLogger(__name__)
_CONNECT_TIMEOUT_S = 5.0
_NODE_CHECK_TIMEOUT_S = 180.0


#: Settings for a Ray this process starts (where the user has not set them; a cluster keeps its own).
#: Ray kills an idle worker process after 1 s once it runs more processes than the node has CPUs,
#: which a Train trial always does (trial actor, controller, ranks, their helper actors): the warm
#: process of the evaluation task (torch, timm and the methods imported) was gone by the next
#: training-free trial, which then spent 8-10 s starting a new one (the quickstart's ToMe trials).
#: Ray's default limit is the CPU count, so the setting never lowers it. A cluster's small CPU
#: workers get the same setting in their pod spec (cluster/kuberay/overlays/cpu).
MIN_WORKERS_SOFT_LIMIT = 16
#: Ray Train starts a preemption watcher (an actor process of its own, importing Ray Train) with every
#: run's worker group, to notice nodes being drained (spot instances); a local Ray is one node, whose
#: loss ends everything anyway. Off there, a 2-worker trial's start-up costs 2.3 CPU-seconds less and
#: it reaches its first step about 1 s sooner on 2 cores (8.7-9.7 s against 9.7-11.8 s, alternating
#: runs, 2026-11-23). A cluster keeps Ray Train's default (on).
LOCAL_RAY_ENV = {
    "RAY_num_workers_soft_limit": str(max(MIN_WORKERS_SOFT_LIMIT, os.cpu_count() or 1)),
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


#: Where Ray's state API and job client find the cluster's dashboard (Ray's own variable).
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
DASHBOARD_PORT = 8265  # Ray's default


def _named_dashboard() -> dict[str, Any]:
    """A dashboard port for the Ray this process starts, and ``RAY_API_SERVER_ADDRESS`` naming it in
    this process's environment, which that Ray's processes inherit.

    Ray's state API finds the cluster from ``RAY_API_SERVER_ADDRESS`` or ``RAY_ADDRESS``, else by
    looking for Ray processes on the machine; Train's placement-group cleaner asks it whether a run's
    controller is alive, and with a second Ray on the machine (another local sweep, a test cluster)
    the lookup failed ("Found multiple active Ray instances"): the placement groups of trials that a
    scheduler stopped were never removed and the next trial's workers never started. The port is
    Ray's usual 8265 when that is free.
    """
    port = _free_port(DASHBOARD_PORT) or _free_port(0)
    os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{port}"
    return {"dashboard_port": port, "dashboard_host": "127.0.0.1"}


def _free_port(port: int) -> int:
    """``port`` (0: any) if it can be bound on loopback now, else 0."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return 0
        return s.getsockname()[1]


def _host_port(address: str) -> tuple[str, int] | None:
    """``host:port`` of a GCS address (``ray://`` and ``http://`` forms are not GCS addresses)."""
    if address in ("auto", "local") or "://" in address:
        return None
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def connect(address: str | None = None, **init_kwargs) -> None:
    """``ray.init`` on ``address`` (else ``RAY_ADDRESS``, else a new local Ray, with ``LOCAL_RAY_ENV``
    and a named dashboard).

    Raises:
        UserError: nothing listens at the address, or the cluster refused this process's token.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:  # a Ray of this process's own
        for key, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(key, value)
        init_kwargs = {**_named_dashboard(), **init_kwargs}
    target = _host_port(address) if address else None
    if target is not None:
        try:
            with socket.create_connection(target, timeout=_CONNECT_TIMEOUT_S):
                pass
        except OSError as e:
            raise UserError(f"Ray cluster at {address} is unreachable ({type(e).__name__}: {e.strerror or e})") from None
    try:
        ray.init(address=address, **init_kwargs)
    except Exception as e:  # AuthenticationError, ConnectionError, ... (their texts run over many lines)
        if ray.is_initialized():
            ray.shutdown()
        raise UserError(_connect_error(address, e)) from None


def _connect_error(address: str | None, e: Exception) -> str:
    where = f"Ray cluster at {address}" if address else "the local Ray"
    from ray.exceptions import AuthenticationError

    chain, cause = [], e
    while cause is not None and len(chain) < 8:  # ray.init raises ConnectionError from the AuthenticationError
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    text = str(e)
    if any(isinstance(c, AuthenticationError) or "InvalidAuthToken" in str(c) for c in chain):
        mode = os.environ.get("RAY_AUTH_MODE", "unset")
        return (
            f"{where} refused this process's token (RAY_AUTH_MODE={mode}; the token comes from RAY_AUTH_TOKEN, "
            "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token and must be the cluster's)"
        )
    first = text.strip().splitlines()[0][:200] if text.strip() else ""
    return f"cannot connect to {where} ({type(e).__name__}: {first})"


# ---------------------------------------------------------------------------------------------------
# Will a trial ever fit?


def worker_bundle(res: ResourcesConfig) -> dict[str, float]:
    """What one DDP worker (or an in-actor evaluation) reserves: its CPUs, and GPUs when it has any."""
    bundle = {"CPU": float(res.cpus_per_worker)}
    if res.gpus_per_worker:
        bundle["GPU"] = float(res.gpus_per_worker)
    return bundle


def _slots(node: Mapping[str, float], bundle: Mapping[str, float]) -> int:
    """How many ``bundle``s fit on a node with the resources ``node``."""
    counts = [math.floor(node.get(k, 0.0) / v + 1e-9) for k, v in bundle.items() if v > 0]
    return min(counts) if counts else 1 << 30


def fit_error(res: ResourcesConfig, evaluates: bool, nodes: Sequence[Mapping[str, float]]) -> str | None:
    """Why a trial with resources ``res`` can never be placed on ``nodes`` (each node's total
    resources), or None when it can. ``evaluates``: the trial trains nothing (``train.epochs: 0``)
    and runs in its own actor on one worker's resources."""
    bundle = worker_bundle(res)
    slots = [_slots(n, bundle) for n in nodes]
    need = 1 if evaluates else res.num_workers
    strategy = "any" if evaluates else res.placement_strategy
    if strategy == "STRICT_PACK":
        ok = max(slots, default=0) >= need
        rule = f"all {need} on one node"
    elif strategy == "STRICT_SPREAD":
        ok = sum(s > 0 for s in slots) >= need
        rule = "each on a different node"
    else:  # PACK, SPREAD (best effort), and an evaluation (one bundle anywhere)
        ok = sum(slots) >= need
        rule = "anywhere"
    if ok:
        return None
    what = ", ".join(f"{k} {_num(v)}" for k, v in bundle.items())
    kinds: dict[str, int] = {}  # each kind of node (in what the bundle needs), in order, with its count
    for n in nodes:
        kind = ", ".join(f"{k} {_num(n.get(k, 0.0))}" for k in bundle)
        kinds[kind] = kinds.get(kind, 0) + 1
    has = "; ".join(f"{c} x {k}" if c > 2 else "; ".join([k] * c) for k, c in kinds.items()) or "no nodes"
    placed = "an evaluation" if evaluates else f"{need} workers ({strategy}: {rule})"
    return f"needs {placed} of {{{what}}} each, but the cluster's {len(nodes)} node(s) have [{has}]"


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def _nodes() -> list[dict[str, float]]:
    """The total resources of each node the cluster has, plus each node an autoscaler may add."""
    nodes = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # an older GCS or no autoscaler: the live nodes are the cluster
        config = None
    for group in getattr(config, "node_group_configs", None) or []:
        count = group.max_count if group.max_count >= 0 else 64  # unbounded: more than any trial asks for
        nodes += [{k: float(v) for k, v in group.resources.items()}] * min(count, 64)
    return nodes


def check_fits(arms: Sequence[tuple[str, ResourcesConfig, bool]]) -> None:
    """Refuse a sweep whose trials (``(method, resources, evaluates)`` per arm) can never be placed.

    Raises:
        UserError: the first arm that cannot fit, with what it needs and what the nodes have.
    """
    nodes = _nodes()
    for method, res, evaluates in arms:
        error = fit_error(res, evaluates, nodes)
        if error:
            raise UserError(f"a {method} trial can never start: it {error} (resources.* in the config)")


# ---------------------------------------------------------------------------------------------------
# Checks from the cluster's nodes


def _check_here(tracking_uri: str, storage_path: str) -> str | None:
    """Runs on a node: the tracking store and the storage path as that node sees them."""
    from . import storage
    from .tracking import check_reachable

    try:
        check_reachable(tracking_uri)
        storage.check_bucket(storage_path)
    except UserError as e:  # TrackingError is a UserError
        return str(e)
    return None


def check_from_nodes(tracking_uri: str, storage_path: str) -> None:
    """Check the tracking store and the storage path from every alive node but this one (whose
    checks the sweep has just made): trials log and checkpoint from there.

    Raises:
        UserError: the first node that cannot reach one of them, with its address.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    others = [n for n in ray.nodes() if n.get("Alive") and n["NodeID"] != here]
    if not others:
        return
    task = ray.remote(num_cpus=0)(_check_here)
    refs = {
        task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(tracking_uri, storage_path):
        n.get("NodeManagerAddress", n["NodeID"])
        for n in others
    }
    ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=_NODE_CHECK_TIMEOUT_S)
    for ref in ready:
        error = ray.get(ref)
        if error:
            raise UserError(f"from Ray node {refs[ref]}: {error}")
    if pending:
        _logger.warning("%d node(s) did not answer the tracking/storage check in %.0f s; going on", len(pending), _NODE_CHECK_TIMEOUT_S)


# ---------------------------------------------------------------------------------------------------
# ray job stop


_STOP: list[float] = []  # when SIGTERM came, if it did


def stop_requested() -> bool:
    """Whether this process got SIGTERM after ``stop_on_sigterm``."""
    return bool(_STOP)


def stop_on_sigterm() -> None:
    """From now on, SIGTERM (what ``ray job stop`` sends by default) acts as Ctrl+C: it calls the
    SIGINT handler installed at that moment (Tune's graceful stop during ``Tuner.fit``, else a
    ``KeyboardInterrupt``). Call it after ``ray.init``, which installs a SIGTERM handler of its own.
    Outside the main thread it does nothing."""
    def on_sigterm(signum, frame):
        _logger.warning("SIGTERM received (ray job stop?): ending the sweep as Ctrl+C would")
        _STOP.append(time.time())
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, frame)
        else:
            raise KeyboardInterrupt

    _STOP.clear()
    try:
        signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread
        pass
