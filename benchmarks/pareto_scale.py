"""Front computation over many runs: ``prunetune pareto``'s path on a sqlite MLflow store.

Creates (once, kept in ``--db``) an experiment of ``--sweeps`` sweeps with ``--runs`` trial runs in
all, as ``prunetune sweep`` records them (parent run, trial children with role/method/backbone tags,
searched params, final metrics; a few failed or stopped trials without a latency; a dense reference
run per sweep), written with ``MlflowClient.log_batch``. Then times, ``--repeat`` times, reading the
runs back (paged ``search_runs``) and computing the combined front, each sweep's hypervolume and a
latency budget's answer: the first read (an empty run cache: every run, then written to the cache),
the repeated read (through the cache: only what changed, ``orchestrator.run_cache``) and, for
comparison, the read without the cache; it checks that the cached rows equal the uncached ones.

    python benchmarks/pareto_scale.py --runs 10000 --sweeps 10 --db /tmp/pareto_scale/mlflow.db

Prints the figures and writes ``--out`` (JSON) with the machine it ran on.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from orchestrator import fronts  # noqa: E402
from orchestrator.tracking import (  # noqa: E402
    OBJECTIVES_TAG, PARENT_TAG, REFERENCE_ROLE, ROLE_TAG, SEARCHED_TAG, SWEEP_TAG, TRIAL_TAG, Tracker, _client,
)

EXPERIMENT = "pareto-scale"
OBJECTIVES = [("val_top1", "max"), ("latency_ms", "min")]
METHODS = ["dynamicvit", "evovit", "spvit", "tome"]


def _unsynced_sqlite() -> None:
    """Creating the runs only: sqlite without an fsync per commit (three commits a run). Reading is
    not affected, and it is what is timed."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    @event.listens_for(Engine, "connect")
    def _pragma(dbapi_connection, _record):  # noqa: ANN001
        if type(dbapi_connection).__module__.startswith("sqlite3"):
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA synchronous=OFF")
            cursor.close()


def _create(uri: str, runs: int, sweeps: int, seed: int = 0) -> float:
    """Write the synthetic experiment; returns the seconds it took."""
    from mlflow.entities import Metric, Param, RunTag

    _unsynced_sqlite()

    client = _client(uri)
    exp_id = Tracker(uri, EXPERIMENT).experiment_id()
    rnd = random.Random(seed)
    now = int(time.time() * 1000)
    start = time.perf_counter()
    per_sweep = [runs // sweeps + (1 if i < runs % sweeps else 0) for i in range(sweeps)]
    for s, n in enumerate(per_sweep):
        method = METHODS[s % len(METHODS)]
        name = f"sweep-{s:02d}"
        tags = {ROLE_TAG: "sweep", SWEEP_TAG: name, SEARCHED_TAG: "keep_ratio,train.lr", OBJECTIVES_TAG: json.dumps(OBJECTIVES), "method": method}
        parent = client.create_run(exp_id, run_name=name, tags=tags).info.run_id
        client.log_batch(parent, params=[Param("model.num_classes", "1000"), Param("keep_ratio", "0.7"), Param("train.lr", "0.0005")])
        dense_latency = 4.0 + 0.1 * s
        ref = client.create_run(exp_id, run_name="dense_reference", tags={ROLE_TAG: REFERENCE_ROLE, PARENT_TAG: parent, "method": "dense", "backbone": "deit_small_patch16_224"})
        client.log_batch(ref.info.run_id, metrics=[Metric(k, v, now, 0) for k, v in {"val_top1": 79.8, "latency_ms": dense_latency, "gflops": 4.6, "throughput_ips": 900.0}.items()])
        client.set_terminated(ref.info.run_id, "FINISHED")
        for i in range(n):
            keep = rnd.uniform(0.3, 0.95)
            tags = {ROLE_TAG: "trial", PARENT_TAG: parent, TRIAL_TAG: f"{s}-{i}", SWEEP_TAG: name, "method": method, "backbone": "deit_small_patch16_224"}
            run = client.create_run(exp_id, run_name=f"trial_{s}_{i}", tags=tags).info.run_id
            acc = 79.8 - 12 * (1 - keep) ** 2 * rnd.uniform(0.5, 1.5)
            latency = dense_latency * (0.25 + 0.75 * keep) * rnd.uniform(0.95, 1.1)
            metrics = {"epoch": 29.0, "val_top1": acc, "val_top5": acc + 15, "latency_ms": latency, "throughput_ips": 900 / keep,
                       "dense_latency_ms": dense_latency, "speedup": dense_latency / latency, "gflops": 4.6 * keep, "dense_gflops": 4.6}
            status = "FINISHED"
            if i % 50 == 7:  # failed after its accuracy, before its measurement; or stopped early
                metrics = {"epoch": 3.0, "val_top1": acc / 2}
                status = "FAILED" if i % 100 == 7 else "KILLED"
            client.log_batch(
                run, metrics=[Metric(k, float(v), now, 29) for k, v in metrics.items()],
                params=[Param("keep_ratio", f"{keep:.4f}"), Param("train.lr", f"{rnd.uniform(1e-4, 1e-3):.6f}"), Param("model.num_classes", "1000")],
                tags=[RunTag("prunetune.searched_params", "keep_ratio,train.lr")],
            )
            client.set_terminated(run, status)
        client.set_terminated(parent, "FINISHED")
        print(f"  created {name}: {n} trials ({time.perf_counter() - start:.0f} s so far)", flush=True)
    return time.perf_counter() - start


def _count(uri: str) -> int:
    try:
        exp_id = Tracker(uri, EXPERIMENT).experiment_id(create=False)
    except Exception:
        return 0
    return len(Tracker(uri, EXPERIMENT).search_runs(f"tags.`{ROLE_TAG}` = 'trial'", [exp_id]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=10000, help="trial runs in all")
    p.add_argument("--sweeps", type=int, default=10)
    p.add_argument("--db", default="/tmp/prunetune_pareto_scale/mlflow.db", help="sqlite file; reused when it already holds the runs")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--budget-ms", type=float, default=3.0)
    p.add_argument("--cache", default="/tmp/prunetune_pareto_scale/cache", help="the run cache's directory (emptied before each first read)")
    p.add_argument("--out", default=None, help="JSON results file")
    p.add_argument("--notes", default="", help="free text recorded in the JSON")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("orchestrator.fronts").setLevel(logging.ERROR)  # the ignored failed runs are expected here
    for noisy in ("alembic", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    db = Path(args.db).resolve()
    db.parent.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{db}"
    have = _count(uri) if db.is_file() else 0
    created_s = None
    if have != args.runs:
        if have:
            raise SystemExit(f"{db} holds {have} trial runs, not {args.runs}: remove it or pick another --db")
        print(f"creating {args.runs} trial runs in {args.sweeps} sweeps in {db} ...", flush=True)
        created_s = _create(uri, args.runs, args.sweeps)
        print(f"created in {created_s:.1f} s ({args.runs / created_s:.0f} runs/s)")

    cache = Path(args.cache).resolve()
    uncached_s, first_s, repeated_s, compute_s, report = [], [], [], [], None
    cpu: dict[str, list[float]] = {"first": [], "repeated": [], "compute": [], "uncached": []}  # this process's CPU seconds

    def timed(key: str, times: list[float], fn):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        times.append(time.perf_counter() - w)
        cpu[key].append(time.process_time() - c)
        return out

    for _ in range(args.repeat):
        shutil.rmtree(cache, ignore_errors=True)
        # An empty cache: every run, then written; then what prunetune pareto does next time; then no cache at all.
        selection = timed("first", first_s, lambda: fronts.read_selection(uri, experiments=[EXPERIMENT], cache=cache))
        selection = timed("repeated", repeated_s, lambda: fronts.read_selection(uri, experiments=[EXPERIMENT], cache=cache))
        report = timed("compute", compute_s, lambda: fronts.compare(selection, budget_ms=args.budget_ms))
        plain = timed("uncached", uncached_s, lambda: fronts.read_selection(uri, experiments=[EXPERIMENT]))
        if plain.rows != selection.rows:
            raise SystemExit("the cached read differs from the uncached one")
    med = statistics.median
    total = [a + b for a, b in zip(repeated_s, compute_s)]
    result = {
        "runs_read": len(selection.rows), "sweeps": len(report.sweeps), "front": len(report.front), "ignored": len(report.ignored),
        "hypervolume": report.hypervolume,
        "first_read_s_median": med(first_s), "first_read_s": first_s,
        "repeated_read_s_median": med(repeated_s), "repeated_read_s": repeated_s,
        "uncached_read_s_median": med(uncached_s), "uncached_read_s": uncached_s,
        "compute_s_median": med(compute_s),
        "repeated_total_s_median": med(total), "repeated_total_s_min": min(total), "repeated_total_s_max": max(total),
        "first_total_s_median": med(first_s) + med(compute_s),
        "cpu_s_median": {k: med(v) for k, v in cpu.items()},
        "repeat": args.repeat, "created_s": created_s,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_average_1m": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d %H:%M")},
        "notes": args.notes,
    }
    print(
        f"{result['runs_read']} runs ({result['sweeps']} sweeps, {result['ignored']} ignored): front of {result['front']}, "
        f"hypervolume {result['hypervolume']:.4g}; median of {args.repeat}: front/hypervolumes/budget {result['compute_s_median'] * 1000:.0f} ms +\n"
        f"  repeated read (cache of ended runs) {result['repeated_read_s_median']:.2f} s = {result['repeated_total_s_median']:.2f} s "
        f"(min {result['repeated_total_s_min']:.2f}, max {result['repeated_total_s_max']:.2f})\n"
        f"  first read (empty cache: every run, then cached) {result['first_read_s_median']:.2f} s = {result['first_total_s_median']:.2f} s\n"
        f"  without the cache (paged search_runs) {result['uncached_read_s_median']:.2f} s\n"
        f"  CPU seconds of this process (what a busy machine does not inflate): "
        + ", ".join(f"{k} {v:.2f}" for k, v in result["cpu_s_median"].items())
    )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
