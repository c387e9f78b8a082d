"""How long a Ray Train run takes to start: Ray Train's own floor beside prunetune's time to first step.

Rounds alternate two runs on one local Ray, started as a sweep starts it, ``--workers`` gloo ranks:

- ``floor``: a bare ``TorchTrainer`` whose per-worker function does nothing. From ``fit()`` to the
  function's first line on every rank: Train's controller process, its placement group, the worker
  processes, their torch import and process group. No orchestration built on Ray Train can start
  its ranks sooner, short of keeping processes across runs, which Ray Train V2 does not.
- ``prunetune``: prunetune's own trainer (``driver.make_trainer``, the real per-worker function,
  one epoch of the quickstart's dense tiny ViT): from ``fit()`` to the first optimiser step on
  rank 0 (``time_to_first_step_s``, as trials record it), and to its first line.

The difference between the two is prunetune's part: importing the methods and timm, building the
run (model, data, optimiser), DDP and the first step itself.

``--processes`` also adds up, per process kind, the CPU time every process on the machine spent during
the ``floor`` runs (Linux: ``/proc``, sampled every 0.1 s; a process that ends loses at most its last
0.1 s): what Ray Train's start-up spends its cores on (its controller, the ranks, its helper actors,
Ray's daemons).

    python benchmarks/startup.py --rounds 5 --processes --out benchmarks/results/startup_cpu.json
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def _first_line(config: dict) -> None:
    """The bare run's per-worker function: note when it started, per rank, and return."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps({"t": time.time()}))


#: Ray's daemons, known by a piece of their command line (Ray's workers are titled ``ray::Kind[.method]``).
_DAEMONS = ("raylet", "gcs_server", "dashboard/agent.py", "dashboard/dashboard.py", "log_monitor", "runtime_env/agent", "autoscaler")


def _process_kind(cmdline: str) -> str:
    """A process's kind: its Ray actor or task title without the method (``ray::TrainController``), a Ray
    daemon, else its program."""
    if cmdline.startswith("ray::"):
        return cmdline.split()[0].split(".")[0]
    for daemon in _DAEMONS:
        if daemon in cmdline:
            return daemon.rsplit("/", 1)[-1].removesuffix(".py")
    return Path(cmdline.split()[0]).name


class ProcessCpu:
    """CPU seconds spent by every process on the machine between ``start`` and ``stop``, by kind.

    Samples ``/proc/*/stat`` every ``interval`` s on a thread: a process that started and ended between
    two samples is missed, one that ends loses its time since the last sample.
    """

    def __init__(self, interval: float = 0.1) -> None:
        self.interval, self.tick = interval, os.sysconf("SC_CLK_TCK")
        self.base: dict[int, float] = {}
        self.started: Counter = Counter()
        self.last: dict[int, tuple[float, str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> dict[int, tuple[float, str | None, str]]:
        found = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    comm, fields = f.read().split(" (", 1)[1].rsplit(")", 1)
                with open(f"/proc/{entry}/cmdline") as f:
                    cmdline = f.read().replace("\0", " ").strip()
            except (OSError, IndexError, ValueError):
                continue  # ended while being read
            stat = fields.split()
            # an exiting process has no command line left: None, it keeps the kind it had (else its comm)
            found[int(entry)] = ((int(stat[11]) + int(stat[12])) / self.tick, _process_kind(cmdline) if cmdline else None, comm)
        return found

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            for pid, (cpu, kind, comm) in self._sample().items():
                self.last[pid] = (cpu, self._kind(self.last[pid][1] if pid in self.last else None, kind, comm))

    @staticmethod
    def _kind(had: str | None, now: str | None, comm: str) -> str:
        """A pooled Ray worker starts under its raylet's command line, idles as ``ray::IDLE``, then takes
        its actor's title (``ray::RayTrainWorker``), which its method calls change (``ray::execute``):
        the first title after ``ray::IDLE`` is the process's kind."""
        if had is None:
            return now or comm
        if now is None or (had.startswith("ray::") and had != "ray::IDLE"):
            return had
        return now

    def start(self) -> "ProcessCpu":
        self.base = {pid: cpu for pid, (cpu, _, _) in self._sample().items()}
        self._thread.start()
        return self

    def stop(self) -> Counter:
        self._stop.set()
        self._thread.join()
        spent: Counter = Counter()
        for pid, (cpu, kind) in self.last.items():
            spent[kind] += cpu - self.base.get(pid, 0.0)
        #: processes that started meanwhile, by kind
        self.started = Counter(kind for pid, (_, kind) in self.last.items() if pid not in self.base)
        return Counter({k: v for k, v in spent.items() if v > 0})


def run_floor(workers: int, threads: int, work: Path, index: int) -> dict:
    import ray.train
    from ray.train.torch import TorchTrainer

    from orchestrator import driver
    from orchestrator.config import ResourcesConfig

    driver.apply_train_env()  # the same controller settings as prunetune's runs
    out = work / f"floor-{index}"
    out.mkdir()
    scaling, torch_config = driver.scaling_config(ResourcesConfig(num_workers=workers, cpus_per_worker=threads))
    trainer = TorchTrainer(
        _first_line, train_loop_config={"out": str(out)}, scaling_config=scaling, torch_config=torch_config,
        run_config=ray.train.RunConfig(name=f"floor-{index}", storage_path=str(work / "ray-runs")),
    )
    start = time.time()
    trainer.fit()
    wall = time.time() - start
    firsts = [json.loads((out / f"rank{r}.json").read_text())["t"] for r in range(workers)]
    return {"to_function_s": max(firsts) - start, "wall_s": wall}


def run_prunetune(data: str, workers: int, threads: int, work: Path, index: int) -> dict:
    from ray.train import UserCallback

    from orchestrator import driver
    from orchestrator.config import ResourcesConfig
    from orchestrator.quickstart import digits_tiny_vit

    class Record(UserCallback):  # runs in the controller: writes the first report's times to a file
        def __init__(self, path: str) -> None:
            self.path = path

        def after_report(self, run_context, metrics, checkpoint) -> None:
            keys = ("time_to_first_step_s", "time_startup_s")
            if not Path(self.path).exists() and all(k in metrics[0] for k in keys):
                Path(self.path).write_text(json.dumps({k: metrics[0][k] for k in keys}))

    exp = digits_tiny_vit(data)
    exp = replace(exp, pretrain=replace(exp.pretrain, epochs=1), resources=ResourcesConfig(num_workers=workers, cpus_per_worker=threads))
    path = work / f"prunetune-{index}.json"
    start = time.time()
    trainer = driver.make_trainer(exp, "pretrain", f"startup-{index}", str(work / "ray-runs"), callbacks=[Record(str(path))], started_at=start)
    trainer.fit()
    wall = time.time() - start
    times = json.loads(path.read_text())
    return {"to_first_step_s": times["time_to_first_step_s"], "to_training_loop_s": times["time_startup_s"], "wall_s": wall}


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per rank")
    p.add_argument("--processes", action="store_true", help="CPU seconds per process kind during the floor runs (Linux)")
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args()

    import ray

    from orchestrator.bench import machine_record
    from orchestrator.cluster import connect
    from orchestrator.console import quiet_worker_logs
    from orchestrator.data import write_digits

    rounds = []
    with tempfile.TemporaryDirectory(prefix="prunetune-startup-") as tmp:
        work = Path(tmp)
        data = str(work / "digits")
        write_digits(data)
        connect(num_cpus=args.workers * args.threads, logging_level=logging.WARNING)  # as a sweep starts its local Ray
        quiet_worker_logs()
        try:
            for i in range(args.rounds):
                cpu = ProcessCpu().start() if args.processes else None
                floor = run_floor(args.workers, args.threads, work, i)
                if cpu is not None:
                    floor["cpu_s_by_process"] = {k: round(v, 2) for k, v in cpu.stop().most_common()}
                    floor["ray_processes_started"] = dict(cpu.started.most_common())
                ours = run_prunetune(data, args.workers, args.threads, work, i)
                rounds.append({"floor": floor, "prunetune": ours, "prunetune_part_s": ours["to_first_step_s"] - floor["to_function_s"]})
                print(
                    f"round {i + 1}/{args.rounds}: Ray Train to a no-op function {floor['to_function_s']:.1f} s; "
                    f"prunetune to its training loop {ours['to_training_loop_s']:.1f} s, to its first step {ours['to_first_step_s']:.1f} s",
                    flush=True,
                )
        finally:
            ray.shutdown()
    summary = {
        "floor_to_function_s": _stats([r["floor"]["to_function_s"] for r in rounds]),
        "prunetune_to_training_loop_s": _stats([r["prunetune"]["to_training_loop_s"] for r in rounds]),
        "prunetune_to_first_step_s": _stats([r["prunetune"]["to_first_step_s"] for r in rounds]),
        "prunetune_part_s": _stats([r["prunetune_part_s"] for r in rounds]),
        "settings": {"workers": args.workers, "threads_per_worker": args.threads, "rounds": args.rounds, "backend": "gloo",
                     "model": "quickstart tiny ViT (4 blocks, 96 channels, 65 tokens), digits 32 px, batch 64 per rank"},
        "machine": machine_record(),
        "rounds": rounds,
    }
    if args.processes:  # per run, over the rounds: median CPU seconds of each kind
        kinds = {k for r in rounds for k in r["floor"]["cpu_s_by_process"]}
        per_kind = {k: statistics.median(r["floor"]["cpu_s_by_process"].get(k, 0.0) for r in rounds) for k in kinds}
        summary["floor_cpu_s_by_process"] = dict(sorted(per_kind.items(), key=lambda kv: -kv[1]))
        total = statistics.median(sum(r["floor"]["cpu_s_by_process"].values()) for r in rounds)
        wall = statistics.median(r["floor"]["wall_s"] for r in rounds)
        summary["floor_cpu_s"] = {"total": total, "wall_s": wall, "cores_busy": total / wall}
        started = Counter(rounds[-1]["floor"]["ray_processes_started"])
        print(f"CPU seconds per floor run (median over rounds), {total:.1f} in all over {wall:.1f} s of wall time "
              f"({total / wall:.2f} cores busy); processes started (last round): {dict(started.most_common())}")
        for kind, sec in summary["floor_cpu_s_by_process"].items():
            if sec >= 0.05:
                print(f"  {sec:6.2f}  {kind}")
    f, s = summary["floor_to_function_s"], summary["prunetune_to_first_step_s"]
    print(
        f"Ray Train's floor (fit() to a no-op function on every rank): median {f['median']:.1f} s ({f['min']:.1f}-{f['max']:.1f}); "
        f"prunetune to its first step: median {s['median']:.1f} s ({s['min']:.1f}-{s['max']:.1f}); "
        f"prunetune's part: median {summary['prunetune_part_s']['median']:.1f} s"
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
