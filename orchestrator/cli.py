"""The ``prunetune`` command line: data, sweep, pipeline, pareto, report, quickstart, methods, validate, eval, bench.

Bad input (a missing file, an unknown method, a malformed search space, an unreachable tracking
server, ...) ends in one line, ``prunetune: error: ...``, and exit code 2, before anything is
recorded.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import UserError
from .yaml_file import read_yaml

__all__ = ["main"]

_logger = logging.getLogger("prunetune")


def _cmd_data(args: argparse.Namespace) -> int:
    from .data import write_digits

    counts = write_digits(args.out, img_size=args.img_size, seed=args.seed)
    print(f"digits written to {args.out}: {counts['train']} train / {counts['val']} val images")
    return 0


def _load(args: argparse.Namespace):
    read_yaml(args.config, "config file")  # a missing or malformed file is named before the imports below (seconds)
    from .config import apply_overrides, load_experiment, parse_set_args
    from .search_space import load_sweep_space

    exp = load_experiment(args.config, parse_set_args(args.set))
    extra = {}
    if args.tracking_uri:
        extra["tracking.uri"] = args.tracking_uri
    if args.experiment:
        extra["tracking.experiment"] = args.experiment
    if extra:
        exp = apply_overrides(exp, extra)
    space = load_sweep_space(exp, base=Path(args.config).resolve().parent)
    return exp, space


def _cmd_validate(args: argparse.Namespace) -> int:
    exp, space = _load(args)
    from .data import check_image_folder
    from .tracking import check_reachable, redact, resolve_uri

    counts = check_image_folder(exp.data.path)
    uri = resolve_uri(exp.tracking.uri)
    check_reachable(uri)
    print(f"config ok: method {', '.join(space.methods())} on {exp.model.name}; data {counts}; tracking {redact(uri)}")
    for arm in space.arms:
        print(f"search space of {arm.method} ({arm.space.source}): {', '.join(arm.space.names())}")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    exp, space = _load(args)
    from .sweep import run_sweep

    outcome = run_sweep(exp, space, name=args.resume or args.name, address=args.address, resume=bool(args.resume))
    _print_outcome(outcome)
    return _exit_code(outcome)


def _cmd_pipeline(args: argparse.Namespace) -> int:
    read_yaml(args.pipeline, "pipeline file")  # before the imports below, as ``_load``
    from .pipeline import run_pipeline

    outcome = run_pipeline(args.pipeline, resume=args.resume, tracking_uri=args.tracking_uri, address=args.address)
    print(f"pipeline {outcome.name}: ran {', '.join(outcome.ran) or 'nothing'}; skipped (finished earlier) {', '.join(outcome.skipped) or 'none'}")
    for name, m in outcome.manifests.items():
        where = m.get("checkpoint") or m.get("sweep") or ""
        print(f"  {name}: {m['status']}, MLflow run {m.get('mlflow_run_id')}, {where}")
    print(f"MLflow: pipeline run {outcome.run_id}")
    return 0


def _exit_code(outcome) -> int:
    """130 for an interrupted sweep (Ctrl+C), 1 when every trial failed, else 0."""
    if outcome.interrupted:
        return 130
    return 1 if outcome.errors == outcome.trials else 0


def _print_outcome(outcome) -> None:
    from .tracking import redact

    stopped = f", {outcome.stopped_early} stopped early by ASHA" if outcome.stopped_early else ""
    stopped += " (interrupted)" if outcome.interrupted else ""
    print(f"\nsweep {outcome.name}: {outcome.trials} trials, {outcome.errors} failed{stopped}; Pareto front ({len(outcome.front)}):")
    print(format_front(outcome.front))
    print(f"\nMLflow: experiment {outcome.experiment!r}, sweep run {outcome.parent_run_id} at {redact(outcome.tracking_uri)}")
    print(f"  browse: mlflow ui --backend-store-uri {redact(outcome.tracking_uri)}" if outcome.tracking_uri.startswith("sqlite") else f"  browse: {redact(outcome.tracking_uri)}")
    print(f"  front:  prunetune pareto --experiment {outcome.experiment} --tracking-uri {redact(outcome.tracking_uri)}")
    if getattr(outcome, "study_storage", None):
        from .study import dashboard_command

        print(f"  optuna: {dashboard_command(outcome.study_storage)}  (study {outcome.name!r})")


def _compare(args: argparse.Namespace):
    """(tracking URI, selection, FrontReport) for the selection options ``pareto`` and ``report`` share."""
    from . import fronts, run_cache
    from .tracking import check_reachable, resolve_uri

    def split(values: list[str] | None) -> list[str]:  # repeatable options that also take comma-separated values
        return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]

    if not args.experiment and not args.sweep:
        raise UserError(f"{args.command} needs --experiment NAME or --sweep RUN_ID (each repeatable)")
    objectives = [fronts.parse_objective(o) for o in args.objective or []]
    reference = fronts.parse_reference(args.reference)
    uri = resolve_uri(args.tracking_uri)
    check_reachable(uri)
    if uri.startswith("sqlite") and not Path(uri[len("sqlite:///"):]).is_file():
        raise UserError(f"tracking store {uri!r} does not exist (no sweep has been recorded there)")
    selection = fronts.read_selection(
        uri, experiments=args.experiment or [], sweeps=args.sweep or [], method=split(args.method),
        backbone=split(args.backbone), device=split(args.device),
        cache=None if getattr(args, "no_cache", False) else run_cache.default_cache_dir(), refresh=getattr(args, "refresh", False),
    )
    report = fronts.compare(
        selection, objectives or None, budget_ms=getattr(args, "budget_ms", None), reference=reference, experiments=args.experiment or [],
        mixed_devices=args.mixed_devices,
    )
    return uri, selection, report


def _cmd_pareto(args: argparse.Namespace) -> int:
    from . import fronts

    uri, selection, report = _compare(args)
    fmt = "json" if args.json else args.format
    registered = None
    if args.register:
        from .registry import choose_run, register_run

        chosen = choose_run(selection.rows, args.run, args.budget_ms, report.within_budget)
        registered = register_run(uri, chosen["run_id"], args.register)
    elif args.run:
        raise UserError("--run chooses the run to --register; give --register NAME too")
    if fmt == "json":
        out = fronts.to_json(report)
        if registered:
            out["registered"] = {"name": registered.name, "version": registered.version, "uri": registered.uri, "run_id": registered.run_id}
        print(json.dumps(out, indent=2))
    elif fmt == "csv":
        sys.stdout.write(fronts.report_csv(report))
    else:
        print(fronts.format_table(report))
    if registered:  # csv/json keep stdout machine-readable
        print(f"registered run {registered.run_id} as {registered.uri} ({registered.serialization})",
              file=sys.stdout if fmt == "table" else sys.stderr)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    if not args.out and not args.png:
        raise UserError("report needs --out FILE.html and/or --png FILE.png")
    if args.images < 0:
        raise UserError(f"--images must be >= 0, got {args.images}")
    uri, selection, report = _compare(args)
    write_report(uri, selection, report, out=args.out, png=args.png, images=args.images)
    for path in (args.out, args.png):
        if path:
            print(f"written: {path}")
    return 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from .quickstart import run_quickstart

    outcome = run_quickstart(Path(args.out), num_samples=args.num_samples)
    _print_outcome(outcome)
    return _exit_code(outcome)


def _cmd_methods(args: argparse.Namespace) -> int:
    from .catalog import method_catalog

    catalog = method_catalog()
    if args.json:
        print(json.dumps(catalog, indent=2, default=str))
        return 0
    for entry in catalog:
        flags = ", ".join(k for k in ("needs_pretrained", "needs_teacher") if entry[k]) or "no dense weights needed"
        print(f"{entry['name']} ({flags}): {entry['summary']}")
        rows = [["parameter", "default", "searched (search_spaces/%s.yaml)" % entry["name"]]]
        for p in entry["parameters"]:
            rows.append([p["name"], json.dumps(p["default"]), p["search"] or "-"])
        for p in entry["searched_elsewhere"]:
            rows.append([p["name"], "", p["search"]])
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        for r in rows:
            print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        print()
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    if args.config:
        read_yaml(args.config, "config file")  # before the imports below, as ``_load``
    from .config import apply_overrides, experiment_from_dict, load_experiment, parse_set_args
    from .data import DataError
    from .evaluate import evaluate_checkpoint

    sets = parse_set_args(args.set)
    if args.config:
        exp = load_experiment(args.config, sets)
    else:
        if not args.method or not args.backbone:
            raise UserError("eval needs --method and --backbone (or --config)")
        exp = experiment_from_dict({"method": args.method, "model": {"name": args.backbone}})
        exp = apply_overrides(exp, {**({"model.num_classes": _count_classes(args.data)} if args.data else {}), **sets})
    if args.data:
        exp = apply_overrides(exp, {"data.path": str(Path(args.data).resolve())})
    if not exp.data.path:
        raise UserError("eval needs --data (an image folder with val/<class>/...)")
    try:
        result = evaluate_checkpoint(exp, args.checkpoint, layout=args.layout, device=args.device)
    except DataError as e:
        raise UserError(str(e)) from None
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    m = result["metrics"]
    print(f"{result['method']} on {result['backbone']} ({result['checkpoint_layout']} checkpoint), {result['device']}:")
    print(f"  val top-1 {m['val_top1']:.2f}%, top-5 {m['val_top5']:.2f}%")
    print(f"  latency {m['latency_ms']:.3f} ms (dense {m['dense_latency_ms']:.3f}, speed-up {m['speedup']:.2f}x)")
    print(f"  throughput {m['throughput_ips']:.1f} img/s (dense {m['dense_throughput_ips']:.1f}, {m['throughput_ratio']:.2f}x)")
    print(f"  {m['gflops']:.3f} GFLOPs (dense {m['dense_gflops']:.3f}, bound {m['dense_gflops'] / m['gflops']:.2f}x)")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import bench_experiment, format_bench, run_bench
    from .config import parse_set_args

    exp = bench_experiment(args.method, args.backbone, parse_set_args(args.set))
    if args.threads:
        if args.threads < 1:
            raise UserError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    from methods.measure import CompiledOutputMismatch

    try:
        result = run_bench(
            exp, batch=args.batch, precision=args.precision, compile=args.compile is not None,
            compile_mode=args.compile or "default", device=args.device,
            checkpoint=args.checkpoint, layout=args.layout, rounds=args.rounds, warmup=args.warmup, iters=args.iters,
            profile=args.profile,
        )
    except CompiledOutputMismatch as e:
        raise UserError(str(e)) from None
    print(json.dumps(result, indent=2) if args.json else format_bench(result))
    return 0


def _count_classes(data: str) -> int:
    val = Path(data) / "val"
    if not val.is_dir():
        raise UserError(f"data folder {data!r} has no val/ folder with one folder per class")
    n = sum(p.is_dir() for p in val.iterdir())
    if n == 0:
        raise UserError(f"data folder {data!r}: val/ has no class folders")
    return n


def format_front(rows: list[dict]) -> str:
    """A plain-text table of Pareto-front rows (run, searched params, key metrics)."""
    if not rows:
        return "  (empty: no trial finished with all objectives measured)"
    metric_keys = ["val_top1", "latency_ms", "speedup", "throughput_ips", "gflops"]
    param_keys = list(dict.fromkeys(k for r in rows for k in r["params"]))
    header = ["run_id"] + param_keys + metric_keys
    lines = [header]
    for r in rows:
        params = [_short(r["params"].get(k, "")) for k in param_keys]
        metrics = [f"{r['metrics'][k]:.4g}" if k in r["metrics"] else "-" for k in metric_keys]
        lines.append([r["run_id"][:8]] + params + metrics)
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  " + "  ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in lines)


def _short(value: str) -> str:
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return str(value)


def _selection_arguments(p: argparse.ArgumentParser) -> None:
    """The options that choose the runs and objectives of a front (``pareto`` and ``report``)."""
    p.add_argument("--experiment", action="append", metavar="NAME", help="MLflow experiment: all its sweeps; repeatable")
    p.add_argument("--sweep", action="append", metavar="RUN_ID", help="a sweep (parent) run id; repeatable; only these sweeps are compared")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLflow's default)")
    p.add_argument("--method", action="append", help="keep runs of this method only (tag method; repeatable or comma-separated)")
    p.add_argument("--backbone", action="append", help="keep runs of this backbone only (tag backbone)")
    p.add_argument("--device", action="append", help="keep runs measured on this device (their `device` tag, e.g. from the table's output)")
    p.add_argument("--mixed-devices", action="store_true", help="combine runs measured on different kinds of device (refused otherwise)")
    p.add_argument("--objective", action="append", metavar="METRIC:MODE",
                   help="an objective of the front, e.g. val_top1:max; repeatable (default: the sweeps' recorded objectives, else val_top1:max latency_ms:min)")
    p.add_argument("--reference", action="append", metavar="METRIC=VALUE",
                   help="hypervolume reference value of an objective (default: chance accuracy, the dense model's cost)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prunetune", description="Accuracy-vs-latency sweeps for sparse vision transformers.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("data", help="materialize a dataset in ImageNet folder layout")
    d.add_argument("dataset", choices=["digits"], help="scikit-learn's digits (8x8, 10 classes), upscaled")
    d.add_argument("--out", required=True, help="folder to create (train/ and val/)")
    d.add_argument("--img-size", type=int, default=32)
    d.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    d.set_defaults(func=_cmd_data)

    for name, func, help_ in (("sweep", _cmd_sweep, "run a Ray Tune + Optuna sweep"), ("validate", _cmd_validate, "check a sweep config without running it")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("config", help="experiment YAML file")
        s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (train.lr=3e-4, keep_ratio=0.6); repeatable")
        s.add_argument("--tracking-uri", help="MLflow tracking URI (default: the config's, else MLflow's default)")
        s.add_argument("--experiment", help="MLflow experiment name (default: the config's)")
        if name == "sweep":
            named = s.add_mutually_exclusive_group()
            named.add_argument("--name", help="sweep name (default: config name + timestamp)")
            named.add_argument("--resume", metavar="NAME", help="continue the interrupted sweep NAME (same config)")
            s.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
        s.set_defaults(func=func)

    pl = sub.add_parser("pipeline", help="run stages in order (warm-up, fine-tune, sweep), each from the previous one's checkpoint")
    pl.add_argument("pipeline", help="pipeline YAML file (see pipelines/)")
    pl.add_argument("--resume", action="store_true", help="continue: skip finished stages, resume the unfinished one; refuse changed inputs")
    pl.add_argument("--tracking-uri", help="MLflow tracking URI (default: the pipeline's, else MLflow's default)")
    pl.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    pl.set_defaults(func=_cmd_pipeline)

    pa = sub.add_parser(
        "pareto", help="the Pareto front of one or several sweeps from MLflow, each sweep's hypervolume, a latency budget's best run",
        description="The combined Pareto front of the sweeps of --experiment (all their sweeps) or of the --sweep runs, "
        "with each sweep's hypervolume against one reference point. Runs that did not finish with every objective "
        "measured are ignored (with a warning).",
    )
    _selection_arguments(pa)
    pa.add_argument("--budget-ms", type=float, metavar="X", help="also answer: the most accurate finished run with latency_ms <= X")
    pa.add_argument("--format", choices=["table", "json", "csv"], default="table",
                    help="output (csv: the front's runs, or with --budget-ms the one answering run)")
    pa.add_argument("--json", action="store_true", help="same as --format json")
    pa.add_argument("--refresh", action="store_true", help="read every run from MLflow again (and cache them anew)")
    pa.add_argument("--no-cache", action="store_true",
                    help="neither read nor write the cache of ended runs ($PRUNETUNE_CACHE_DIR, else ~/.cache/prunetune/runs)")
    pa.add_argument("--register", metavar="NAME",
                    help="register the chosen run's model (--run, else the --budget-ms answer) in MLflow's Model Registry as a new version of NAME")
    pa.add_argument("--run", metavar="RUN_ID", help="with --register: the run to register (a finished run compared here; 8+ leading characters do)")
    pa.set_defaults(func=_cmd_pareto)

    rp = sub.add_parser(
        "report", help="an interactive HTML report of a front (and its PNG): every run per method, the front, the dense reference, what the front models prune",
        description="The front of the same selection as pareto, as one self-contained HTML page (plotly, works offline): "
        "accuracy against the cost objective per method, hover with parameters and run ids, links to the MLflow runs, "
        "and for token methods the tokens each front model keeps or merges on the first validation images.",
    )
    _selection_arguments(rp)
    rp.add_argument("--out", metavar="FILE.html", help="write the HTML report here")
    rp.add_argument("--png", metavar="FILE.png", help="write the front's static plot here")
    rp.add_argument("--images", type=int, default=4, help="validation images per front model in the token views (0: none; default 4)")
    rp.set_defaults(func=_cmd_report)

    q = sub.add_parser("quickstart", help="digits + dense tiny ViT + a DynamicViT and ToMe sweep, all in one folder")
    q.add_argument("--out", default="prunetune-quickstart", help="folder for everything it writes")
    q.add_argument("--num-samples", type=int, default=8, help="trials in the sweep")
    q.set_defaults(func=_cmd_quickstart)

    m = sub.add_parser("methods", help="list the registered methods: parameters, defaults, searched ranges")
    m.add_argument("--json", action="store_true", help="machine-readable output")
    m.set_defaults(func=_cmd_methods)

    e = sub.add_parser("eval", help="evaluate and measure one model from a checkpoint (a trial's, or a published one)")
    e.add_argument("--checkpoint", required=True, help="path or s3:// URI: prunetune's layout, or the method authors' (model zoo)")
    e.add_argument("--method", help="registered method (see prunetune methods)")
    e.add_argument("--backbone", help="timm model name, e.g. deit_small_patch16_224")
    e.add_argument("--config", help="or take method, model, data and measure settings from a sweep config")
    e.add_argument("--data", help="image folder with val/<class>/... (classes counted for the head size)")
    e.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a method or config field (keep_ratio=0.7, model.img_size=384)")
    e.add_argument("--layout", choices=["auto", "prunetune", "reference"], default="auto", help="checkpoint key layout (default: try both)")
    e.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    e.add_argument("--json", action="store_true", help="machine-readable output")
    e.set_defaults(func=_cmd_eval)

    b = sub.add_parser("bench", help="time a method's model beside its dense backbone: throughput, latency, GFLOPs, speed-up vs FLOPs bound")
    b.add_argument("--method", required=True, help="registered method (see prunetune methods)")
    b.add_argument("--backbone", required=True, help="timm model name, e.g. deit_small_patch16_224")
    b.add_argument("--set", action="append", metavar="PARAM=VALUE",
                   help="a method parameter as prunetune methods names it (keep_ratio=0.7), or model.*/measure.*; repeatable")
    b.add_argument("--batch", type=int, default=1, help="images per forward (default 1)")
    b.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="fp32, or autocast to bf16/fp16")
    b.add_argument("--compile", nargs="?", const="default", metavar="MODE",
                   help="torch.compile both models; MODE is torch.compile's (default; reduce-overhead: CUDA graphs, for small GPU batches)")
    b.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    b.add_argument("--checkpoint", help="weights: a path or s3:// URI (default: random weights; speed does not depend on them)")
    b.add_argument("--layout", choices=["auto", "prunetune", "reference"], default="auto", help="checkpoint key layout")
    b.add_argument("--rounds", type=int, help="interleaved rounds (default: measure.rounds, 3)")
    b.add_argument("--warmup", type=int, help="untimed calls per round (default: about 10 images' worth)")
    b.add_argument("--iters", type=int, help="timed calls per round (default: about 30 images' worth, at least 3)")
    b.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's; 1 is steadier on a shared machine)")
    b.add_argument("--profile", type=int, default=0, metavar="K",
                   help="also list each model's K most expensive operators (torch.profiler; gathers, copies, host syncs)")
    b.add_argument("--json", action="store_true", help="one JSON object")
    b.set_defaults(func=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S",
    )
    for noisy in ("alembic", "mlflow.store.db.utils", "matplotlib", "urllib3", "botocore", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except UserError as e:
        print(f"prunetune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prunetune: interrupted", file=sys.stderr)
        return 130
    finally:
        if argv is None:  # this process's own command line, about to exit (never an in-process call)
            _skip_final_collection()


def _skip_final_collection() -> None:
    """Freeze every object the collector tracks, so the interpreter's last garbage collection at exit
    (every object torch, Ray and MLflow made: 2-2.5 s after a sweep on 2 cores) skips them. Exit
    handlers still run (``ray.shutdown``, logging's flush); what is left is freed with the process."""
    import gc

    gc.freeze()


if __name__ == "__main__":
    sys.exit(main())
