"""Searchers compared by hypervolume: TPE, NSGA-II, random search and MO-ASHA on the digits.

Every sweep is a real ``prunetune`` sweep (``orchestrator.sweep.run_sweep``): DynamicViT on the
quickstart's tiny ViT (``orchestrator.quickstart.digits_tiny_vit``), searched over the shipped
``dynamicvit`` space, accuracy (``val_top1``, max) against ``gflops`` (min), with a fixed budget of
trials. GFLOPs is the cost objective because it does not depend on the machine's load: on a shared
machine latency and throughput would make the comparison a comparison of the neighbours' jobs.
MO-ASHA is TPE with ``sweep.asha`` (two objectives: ``orchestrator.schedulers.MultiObjectiveASHA``).
All searchers start with ``--startup`` random trials (TPE's ``n_startup_trials``, NSGA-II's population
size; Optuna's defaults, 10 and 50, would make every searcher random search at this budget); for one
seed the samplers draw those from the same random stream, so the first trials are common to all.

One Ray instance serves all sweeps, one sqlite MLflow store records them (a fresh experiment per
invocation), and the dense backbone is trained once (reused from ``--work`` when it is there) and
given to every sweep as ``model.pretrained``. Each sweep logs its front's hypervolume after every
finished trial on its parent run (metric ``hypervolume``, step = trials finished) against its own
reference point (tag ``prunetune.hv_reference``: chance accuracy, the dense model's GFLOPs); the
benchmark reads those curves and checks each sweep's reference against the common one (the first
sweep's); a curve logged against a different point is recomputed from the sweep's finished trials
(in order of their end) against the common point.

    python benchmarks/samplers.py --seeds 0 1 2 --trials 8 --epochs 2 \\
        --out benchmarks/results/samplers_digits_cpu.json

Prints a table and writes ``--out`` (JSON; rewritten after every sweep, so a cut-short run keeps what
finished) with the machine it ran on.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import methods  # noqa: F401  (the CPU torchvision guard, before timm)
from methods import MeasureConfig
from orchestrator import driver
from orchestrator.config import AshaConfig, Objective, ResourcesConfig, SweepConfig, TrackingConfig
from orchestrator.data import write_digits
from orchestrator.pareto import hypervolume
from orchestrator.quickstart import digits_tiny_vit
from orchestrator.search_space import load_sweep_space
from orchestrator.sweep import init_ray, run_sweep
from orchestrator.tracking import HV_REFERENCE_TAG, HYPERVOLUME_METRIC, ROLE_TAG, STOPPED_EARLY_TAG, Tracker

SEARCHERS = {  # name -> (sweep.sampler, with MO-ASHA)
    "tpe": ("tpe", False),
    "nsga2": ("nsga2", False),
    "random": ("random", False),
    "mo-asha": ("tpe", True),
}
OBJECTIVES = (Objective("val_top1", "max"), Objective("gflops", "min"))


def _train_subset(data: Path, fraction: float) -> Path:
    """``data`` with the first ``fraction`` of each class's training images (links; val/ whole)."""
    out = data.parent / f"{data.name}-train{fraction:g}"
    if not out.is_dir():
        for cls in sorted(p for p in (data / "train").iterdir() if p.is_dir()):
            files = sorted(cls.iterdir())
            (out / "train" / cls.name).mkdir(parents=True)
            for f in files[:max(1, math.ceil(fraction * len(files)))]:
                (out / "train" / cls.name / f.name).symlink_to(f)
        (out / "val").symlink_to(data / "val", target_is_directory=True)
    return out


def _machine() -> dict:
    import torch

    return {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
    }


def _curve(tracker: Tracker, parent: str) -> list[tuple[int, float]]:
    """The sweep's logged hypervolume curve, (trials finished, hypervolume), by step."""
    history = tracker.client.get_metric_history(parent, HYPERVOLUME_METRIC)
    return sorted({m.step: m.value for m in history}.items())


def _recomputed(tracker: Tracker, parent: str, objectives, reference: dict) -> list[tuple[int, float]]:
    """The curve recomputed against ``reference``: finished, not stopped trials in order of their end."""
    runs = [
        r for r in tracker.children(parent)
        if r.data.tags.get(ROLE_TAG) == "trial" and r.info.status == "FINISHED" and r.data.tags.get(STOPPED_EARLY_TAG) != "true"
    ]
    runs.sort(key=lambda r: r.info.end_time or 0)
    points = [r.data.metrics for r in runs]
    return [(k, hypervolume(points[:k], objectives, reference)) for k in range(1, len(points) + 1)]


def _at_each_step(curve: list[tuple[int, float]], trials: int) -> list[float]:
    """The curve as the hypervolume after 1..trials finished trials (carried forward; 0 before the first)."""
    out, value, by_step = [], 0.0, dict(curve)
    for k in range(1, trials + 1):
        value = by_step.get(k, value)
        out.append(value)
    return out


def _summary(sweeps: list[dict], trials: int) -> dict:
    """Per searcher, over the seeds that every searcher with a result finished (a run cut short
    compares like with like)."""
    searchers = [s for s in SEARCHERS if any(x["searcher"] == s for x in sweeps)]
    complete = [seed for seed in dict.fromkeys(s["seed"] for s in sweeps) if {s["searcher"] for s in sweeps if s["seed"] == seed} >= set(searchers)]
    out = {}
    for searcher in searchers:
        done = [s for s in sweeps if s["searcher"] == searcher and s["seed"] in complete]
        if not done:
            continue
        finals = [s["final_hypervolume"] for s in done]
        curves = [_at_each_step([tuple(p) for p in s["curve"]], trials) for s in done]
        out[searcher] = {
            "seeds": [s["seed"] for s in done],
            "final_hypervolume_mean": statistics.fmean(finals),
            "final_hypervolume_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "mean_curve": [statistics.fmean(c[k] for c in curves) for k in range(trials)],
            "trials_finished_mean": statistics.fmean(s["trials_finished"] for s in done),
            "stopped_early_mean": statistics.fmean(s["stopped_early"] for s in done),
            "wall_s_mean": statistics.fmean(s["wall_s"] for s in done),
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--trials", type=int, default=8, help="trials per sweep (the fixed budget)")
    p.add_argument("--startup", type=int, default=4, help="random trials before TPE / NSGA-II model (population size)")
    p.add_argument("--epochs", type=int, default=2, help="DynamicViT fine-tuning epochs per trial (MO-ASHA needs 2 or more)")
    p.add_argument("--concurrent", type=int, default=2, help="trials in parallel (one 1-CPU worker each)")
    p.add_argument("--pretrain-epochs", type=int, default=10)
    p.add_argument("--train-fraction", type=float, default=1.0,
                   help="trials fine-tune on this share of each class's training images (the dense model trains on all)")
    p.add_argument("--searchers", nargs="+", default=list(SEARCHERS), choices=list(SEARCHERS))
    p.add_argument("--work", default="/tmp/prunetune-bench-samplers", help="data, Ray storage, MLflow store (the dense model is reused)")
    p.add_argument("--out", default=None, help="JSON results file")
    p.add_argument("--notes", default="", help="free text recorded in the JSON")
    p.add_argument("--append", action="store_true",
                   help="keep the sweeps already in --out (same budget) and run only the (searcher, seed) pairs it lacks")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    start = time.perf_counter()

    work = Path(args.work).resolve()
    data = work / "data" / "digits"
    if not (data / "val").is_dir():
        write_digits(str(data))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = digits_tiny_vit(str(data))
    exp = replace(
        base, name="bench-samplers",
        pretrain=replace(base.pretrain, epochs=args.pretrain_epochs),
        train=replace(base.train, epochs=args.epochs),
        resources=ResourcesConfig(num_workers=1, cpus_per_worker=1),
        # GFLOPs (the objective) are counted, not timed: the timings every trial also takes are kept short.
        measure=MeasureConfig(batch_size=16, warmup=1, iters=3, rounds=1),
        tracking=TrackingConfig(uri=f"sqlite:///{work / 'mlflow.db'}", experiment=f"bench-samplers-{stamp}"),
        storage_path=str(work / "runs"),
    )
    tracker = Tracker(exp.tracking.uri, exp.tracking.experiment)
    init_ray()
    t0 = time.perf_counter()
    # Pre-training has the machine to itself: one worker with every core (the weights do not depend on it).
    pretrained = driver.train_dense(replace(exp, resources=ResourcesConfig(num_workers=1, cpus_per_worker=os.cpu_count() or 1)), tracker)
    pretrain_s = time.perf_counter() - t0
    exp = replace(exp, model=replace(exp.model, pretrained=pretrained))
    if args.train_fraction < 1.0:
        exp = replace(exp, data=replace(exp.data, path=str(_train_subset(data, args.train_fraction))))
    objectives = [(o.metric, o.mode) for o in OBJECTIVES]

    common: dict | None = None
    sweeps: list[dict] = []
    if args.append and args.out and Path(args.out).is_file():
        previous = json.loads(Path(args.out).read_text())
        if previous["budget"]["trials"] != args.trials or previous["budget"]["epochs"] != args.epochs:
            raise SystemExit(f"--append: {args.out} ran another budget ({previous['budget']})")
        sweeps, common = previous["sweeps"], previous["reference"]
    done = {(s["searcher"], s["seed"]) for s in sweeps}

    def write() -> dict:
        result = {
            "benchmark": "samplers", "data": "digits (scikit-learn, 8x8 upscaled to 32x32)",
            "model": "quickstart tiny ViT (4 blocks, 96 channels), DynamicViT pruning_loc (1, 2, 3), search space search_spaces/dynamicvit.yaml",
            "objectives": [[o.metric, o.mode] for o in OBJECTIVES], "reference": common,
            "budget": {"trials": args.trials, "startup_trials": args.startup, "epochs": args.epochs, "concurrent": args.concurrent,
                       "workers_per_trial": 1, "cpus_per_worker": 1, "pretrain_epochs": args.pretrain_epochs,
                       "train_fraction": args.train_fraction},
            "seeds": args.seeds, "mo_asha": {"grace_period": 1, "reduction_factor": 2},
            "pretrain_s": pretrain_s, "wall_s": time.perf_counter() - start, "machine": _machine(), "notes": args.notes,
            "summary": _summary(sweeps, args.trials), "sweeps": sweeps,
        }
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        return result

    for seed in args.seeds:  # seed-major: a cut-short run still has every searcher on the first seeds
        for searcher in args.searchers:
            if (searcher, seed) in done:
                continue
            sampler, mo_asha = SEARCHERS[searcher]
            sweep_exp = replace(
                exp, train=replace(exp.train, seed=seed),
                sweep=SweepConfig(
                    search_space="dynamicvit", objectives=OBJECTIVES, num_samples=args.trials, max_concurrent_trials=args.concurrent,
                    sampler=sampler, seed=seed, startup_trials=args.startup, asha=AshaConfig() if mo_asha else None,
                ),
            )
            name = f"{searcher}-seed{seed}-{stamp}"
            t = time.perf_counter()
            outcome = run_sweep(sweep_exp, load_sweep_space(sweep_exp), name=name)
            wall = time.perf_counter() - t
            if outcome.interrupted:  # Ctrl+C or SIGTERM: Tune returns what ran; a cut-short sweep is no result
                raise SystemExit(f"{name} interrupted; results so far in {args.out} (continue with --append)")
            parent = tracker.client.get_run(outcome.parent_run_id)
            reference = json.loads(parent.data.tags.get(HV_REFERENCE_TAG) or "{}")
            common = common or reference
            logged = _curve(tracker, outcome.parent_run_id)
            same = bool(reference) and all(math.isclose(reference[m], common[m], rel_tol=1e-9) for m, _ in objectives)
            curve = logged if same or not common else _recomputed(tracker, outcome.parent_run_id, objectives, common)
            sweeps.append({
                "searcher": searcher, "seed": seed, "sweep": name, "parent_run_id": outcome.parent_run_id,
                "trials": outcome.trials, "errors": outcome.errors, "stopped_early": outcome.stopped_early,
                "trials_finished": logged[-1][0] if logged else 0, "front_size": len(outcome.front), "reference": reference,
                "curve_source": "logged" if same else "recomputed against the common reference",
                "curve": [list(c) for c in curve], "final_hypervolume": curve[-1][1] if curve else 0.0,
                "front": [{k: r["metrics"].get(k) for k in ("val_top1", "gflops")} for r in outcome.front],
                "wall_s": wall,
            })
            print(f"{name}: hypervolume {sweeps[-1]['final_hypervolume']:.4g} after {sweeps[-1]['trials_finished']} finished trials "
                  f"({outcome.stopped_early} stopped early, {outcome.errors} failed), {wall:.0f} s", flush=True)
            write()

    result = write()
    print(f"\nDynamicViT on the digits, {args.trials} trials per sweep ({args.startup} random first), {args.epochs} epochs, "
          f"{len(args.seeds)} seeds, hypervolume of (val_top1 max, gflops min) against {common} ({result['wall_s']:.0f} s):")
    print(f"  {'searcher':<8} {'hypervolume':>20} {'finished':>9} {'stopped':>8} {'wall s':>7}")
    for searcher, row in result["summary"].items():
        hv = f"{row['final_hypervolume_mean']:.4g} ± {row['final_hypervolume_std']:.2g}"
        print(f"  {searcher:<8} {hv:>20} {row['trials_finished_mean']:>9.1f} {row['stopped_early_mean']:>8.1f} {row['wall_s_mean']:>7.0f}")


if __name__ == "__main__":
    main()
