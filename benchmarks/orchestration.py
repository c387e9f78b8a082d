"""What Ray Train costs: one training run under Ray Train against the same loop under ``torchrun``.

Both sides train the dense tiny ViT on the digits (the quickstart's model) with ``--workers`` gloo
ranks of ``--threads`` CPU threads each, for ``--epochs`` epochs, through the same code:
``orchestrator.loop.build_run`` + ``loop.fit`` (train, evaluate, rank 0 writes a checkpoint every
epoch). Ray's side is prunetune's own trainer (``driver.make_trainer`` with the real per-worker
function); torchrun's side wraps the model in DDP itself and saves the checkpoints to a folder.
Runs alternate (ray, torchrun, ray, ...) for ``--rounds`` rounds; per round:

- training throughput: images/s over the epochs after the first (sum of every rank's images over
  rank 0's training time, evaluation and checkpointing excluded), and its ratio ray / torchrun;
- wall time of the whole run, from the launch to the process or ``fit()`` returning.

    python benchmarks/orchestration.py --rounds 3 --epochs 4 --out benchmarks/results/orchestration_cpu.json
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def _experiment(data: str, epochs: int, workers: int, threads: int):
    from orchestrator.config import ResourcesConfig
    from orchestrator.quickstart import digits_tiny_vit

    exp = digits_tiny_vit(data)
    return replace(
        exp,
        pretrain=replace(exp.pretrain, epochs=epochs),
        resources=ResourcesConfig(num_workers=workers, cpus_per_worker=threads),
    )


def _throughput(epochs: list[dict]) -> float:
    """Images/s over the epochs after the first: all ranks' images over rank 0's training time."""
    later = [e for e in epochs if e["epoch"] >= 1] or epochs
    images = sum(e["images"] for e in later)
    return images / sum(e["epoch_time_s"] for e in later)


# --- torchrun side -----------------------------------------------------------------------------


def _torchrun_worker(args: argparse.Namespace) -> None:
    """One rank under torchrun: the same build_run + fit as a Ray Train worker, DDP done here."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from orchestrator import loop

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    exp = _experiment(args.data, args.epochs, world, args.threads)
    run = loop.build_run(exp, "pretrain", torch.device("cpu"), rank, world)
    run.model = DistributedDataParallel(run.raw, **loop.ddp_options(run.method))
    epochs = []
    out = Path(args.checkpoints)

    def report(metrics: dict, state: dict | None) -> None:
        if "train_samples" in metrics:
            seen = torch.tensor([float(metrics["train_samples"])])
            dist.all_reduce(seen)
            epochs.append({"epoch": int(metrics["epoch"]), "images": float(seen), "epoch_time_s": metrics["epoch_time_s"]})
        if state is not None:
            torch.save(state, out / f"checkpoint_epoch_{int(metrics['epoch']):04d}.pt")
        dist.barrier()

    loop.fit(run, report)
    if rank == 0:
        Path(args.result).write_text(json.dumps(epochs))
    del run  # DDP's Reducer must not outlive the process group: destroying gloo under the GIL can deadlock
    dist.destroy_process_group()


def run_torchrun(data: str, epochs: int, workers: int, threads: int, work: Path) -> dict:
    result, checkpoints = work / "torchrun.json", work / "torchrun-checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={workers}", __file__, "--torchrun-worker",
        "--data", data, "--epochs", str(epochs), "--threads", str(threads), "--result", str(result), "--checkpoints", str(checkpoints),
    ]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    per_epoch = json.loads(result.read_text())
    return {"throughput_ips": _throughput(per_epoch), "wall_s": wall, "epochs": per_epoch}


# --- Ray Train side ----------------------------------------------------------------------------


def run_ray(data: str, epochs: int, workers: int, threads: int, work: Path, index: int) -> dict:
    from ray.train import UserCallback

    from orchestrator import driver

    reports: list[dict] = []

    class Record(UserCallback):  # runs in the controller: Ray ships it there and back by value, so write to a file
        def __init__(self, path: str) -> None:
            self.path = path

        def after_report(self, run_context, metrics, checkpoint) -> None:
            if "train_samples" in metrics[0]:
                row = {"epoch": int(metrics[0]["epoch"]), "images": float(sum(m["train_samples"] for m in metrics)),
                       "epoch_time_s": metrics[0]["epoch_time_s"]}
                with open(self.path, "a") as f:
                    f.write(json.dumps(row) + "\n")

    path = work / f"ray-{index}.jsonl"
    exp = _experiment(data, epochs, workers, threads)
    trainer = driver.make_trainer(exp, "pretrain", f"overhead-{index}", str(work / "ray-runs"), callbacks=[Record(str(path))])
    start = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - start
    reports = [json.loads(line) for line in path.read_text().splitlines()]
    return {"throughput_ips": _throughput(reports), "wall_s": wall, "epochs": reports}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per rank")
    p.add_argument("--out", help="write the figures as JSON here")
    p.add_argument("--data", help="digits folder (default: written to a temporary folder)")
    # the torchrun rank entry point (internal)
    p.add_argument("--torchrun-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--checkpoints", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.torchrun_worker:
        _torchrun_worker(args)
        return

    import ray

    from orchestrator.cluster import connect
    from orchestrator.console import quiet_worker_logs
    from orchestrator.data import write_digits

    with tempfile.TemporaryDirectory(prefix="prunetune-overhead-") as tmp:
        work = Path(tmp)
        data = args.data or str(work / "digits")
        if not args.data:
            write_digits(data)
        # As a sweep starts its local Ray (dashboard included: Ray Train's placement-group cleaner
        # asks its state API every second, and logs a warning each time it cannot).
        connect(num_cpus=args.workers * args.threads, logging_level=logging.WARNING)
        quiet_worker_logs()
        rounds = []
        try:
            for i in range(args.rounds):
                r = run_ray(data, args.epochs, args.workers, args.threads, work, i)
                t = run_torchrun(data, args.epochs, args.workers, args.threads, work)
                ratio = r["throughput_ips"] / t["throughput_ips"]
                rounds.append({"ray": r, "torchrun": t, "throughput_ratio": ratio})
                print(
                    f"round {i + 1}/{args.rounds}: ray {r['throughput_ips']:.1f} img/s ({r['wall_s']:.1f} s wall), "
                    f"torchrun {t['throughput_ips']:.1f} img/s ({t['wall_s']:.1f} s wall): ratio {ratio:.3f}",
                    flush=True,
                )
        finally:
            ray.shutdown()
    ratios = [r["throughput_ratio"] for r in rounds]
    summary = {
        "throughput_ratio_median": statistics.median(ratios),
        "throughput_ratio_min": min(ratios),
        "throughput_ratio_max": max(ratios),
        "ray_wall_s_median": statistics.median(r["ray"]["wall_s"] for r in rounds),
        "torchrun_wall_s_median": statistics.median(r["torchrun"]["wall_s"] for r in rounds),
        "settings": {"workers": args.workers, "threads_per_worker": args.threads, "epochs": args.epochs, "rounds": args.rounds,
                     "model": "quickstart tiny ViT (4 blocks, 96 channels, 65 tokens), digits 32 px, batch 64 per rank"},
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "date": time.strftime("%Y-%m-%d")},
        "rounds": rounds,
    }
    print(
        f"Ray Train / torchrun training throughput: median {summary['throughput_ratio_median']:.3f} "
        f"(min {summary['throughput_ratio_min']:.3f}, max {summary['throughput_ratio_max']:.3f}); "
        f"wall per run: ray {summary['ray_wall_s_median']:.1f} s, torchrun {summary['torchrun_wall_s_median']:.1f} s"
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
