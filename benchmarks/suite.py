"""The speed suite: every method at its paper setting beside its dense DeiT, per model, batch and mode.

Each row is one ``prunetune bench`` run (``orchestrator.bench.run_bench``, the code behind a trial's
latency figures): the method's model and the dense backbone timed in this process, interleaved round
by round, random weights, 224 px. A ``dense`` row times the dense model beside a copy of itself: its
speed-up should be 1.00 and its spread says how far repeats on this machine agree.

    python benchmarks/suite.py                                     # the full CPU table (hours on 2 cores)
    python benchmarks/suite.py --models deit_tiny --batches 1,32 --modes eager --rounds 3   # a smoke run

Rows are appended to ``--out`` (JSON) as they finish, each with the machine it ran on, and ``--out``
with ``.md`` holds the Markdown table; a second run with the same ``--out`` skips the rows already
there (run it in pieces; ``--redo`` measures them again). One line of progress per row.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

import methods  # noqa: F401  (the CPU torchvision guard, before timm)
from methods import list_methods
from orchestrator.bench import bench_experiment, device_and_precision, machine_record, run_bench
from orchestrator.errors import UserError

MODELS = {"deit_tiny": "deit_tiny_patch16_224", "deit_small": "deit_small_patch16_224", "deit_base": "deit_base_patch16_224"}

#: Each method at its paper setting on a 12-block DeiT at 224 px (../shared/reference/methods.md);
#: {} is the method's own defaults, which are the paper's. Per model where the paper differs.
PAPER: dict[str, dict[str, dict]] = {
    "dense": {},  # the A/A row: dense beside a copy of itself
    "dynamicvit": {"*": {"keep_ratio": 0.7, "pruning_loc": [3, 6, 9]}},
    "evovit": {"*": {"prune_ratio": 0.5, "prune_location": 4}},
    "spvit": {"*": {}},  # keep ratios 0.617 / 0.369 / 0.137 before blocks 3, 6, 9
    "tome": {"*": {"r": 13}},  # ToMe's DeiT-Ti / DeiT-S / ViT-B figures are all at r = 13
    "dvt": {"*": {}},  # random input, uncalibrated thresholds: every image runs to the last exit
    "svite": {"*": {}},  # unstructured masks: dense compute (density 0.4)
    "s2vite": {"*": {}},  # structured: the exported smaller network (heads 0.7, MLP 0.6)
}


#: A row's mode -> (torch.compile on both models, its mode).
MODES = {"eager": (False, "default"), "compiled": (True, "default"), "cudagraphs": (True, "reduce-overhead")}


def setting(method: str, model: str) -> dict:
    table = PAPER.get(method, {})
    return dict(table.get(model, table.get("*", {})))


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def row_key(row: dict) -> tuple:
    return (row["model"], row["method"], row["batch"], row["mode"], row["precision"])


def markdown(doc: dict) -> str:
    """The results as a Markdown table, with the machine it ran on."""
    m = doc["machine"]
    where = m.get("gpu") or f"{m['cpu']}, {m['cpus_usable']} cores usable, {m['torch_threads']} torch threads"
    lines = [f"**{doc['note']}**", ""] if doc.get("note") else []
    dates = sorted(r["machine"]["date"] for r in doc["rows"] if "date" in r.get("machine", {}))
    when = f"rows measured {dates[0]} to {dates[-1]}" if len(set(dates)) > 1 else (dates[0] if dates else doc["started"])
    lines += [
        f"Speed suite on {doc['device']} ({where}), torch {m['torch']}, {when}; random weights, 224 px, "
        f"{doc['rounds']} interleaved rounds per row; speed-up = throughput over dense's, "
        "cycle-by-cycle ratio, median (min-max of the rounds' medians); "
        "bound = dense / method GFLOPs; efficiency = speed-up / bound; ± = (max - min) / median over rounds.",
        "",
        "| model | method | batch | mode | precision | GFLOPs | bound | img/s | dense img/s | speed-up | efficiency |",
        "| --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in doc["rows"]:
        head = f"| {r['model']} | {r['method']} | {r['batch']} | {r['mode']} | {r['precision']} |"
        if "error" in r:
            lines.append(f"{head} failed: {r['error'][:80]} | | | | | |")
            continue
        lines.append(
            f"{head} {r['gflops']:.2f} | {r['flops_bound']:.2f} | {r['throughput_ips']:.1f} ±{r['throughput_spread']:.0%} | "
            f"{r['dense_throughput_ips']:.1f} ±{r['dense_throughput_spread']:.0%} | "
            f"{r['speedup']:.2f} ({r['speedup_min']:.2f}-{r['speedup_max']:.2f}) | {r['efficiency']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _write(doc: dict, out: Path) -> None:
    """Both files replaced atomically: an interrupted run leaves the last complete state."""
    for path, text in ((out, json.dumps(doc, indent=2)), (out.with_suffix(".md"), markdown(doc))):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)} (or timm names)")
    p.add_argument("--batches", default=None, help="comma-separated (default 1,32; 1,32,256 on a GPU)")
    p.add_argument("--modes", default=None, help="of eager, compiled (torch.compile on both models) and cudagraphs "
                   "(compiled with mode reduce-overhead; GPU only); default eager,compiled (and cudagraphs on a GPU)")
    p.add_argument("--methods", default="all", help="comma-separated, or all (every registered method; dense is the A/A row)")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"], help="default fp32 on CPU, bf16 on a GPU")
    p.add_argument("--device", default=None, help="default cuda if available, else cpu")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds per row")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per round (default: about 10 images' worth)")
    p.add_argument("--iters", type=int, default=None, help="timed calls per round (default: about 30 images' worth, at least 3)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/suite_<device>_<date>.json); .md beside it")
    p.add_argument("--redo", action="store_true", help="measure rows already in --out again")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, precision = device_and_precision(args.device, args.precision)
    on_gpu = torch.device(device).type == "cuda"
    batches = [int(b) for b in _split(args.batches or ("1,32,256" if on_gpu else "1,32"))]
    modes = _split(args.modes or ("eager,compiled,cudagraphs" if on_gpu else "eager,compiled"))
    if not set(modes) <= set(MODES):
        p.error(f"--modes: of {', '.join(MODES)}, got {args.modes!r}")
    chosen = list_methods() if args.methods == "all" else _split(args.methods)
    chosen = ["dense"] + [m for m in chosen if m != "dense"]
    unknown = [m for m in chosen if m not in list_methods()]
    if unknown:
        p.error(f"--methods: unknown {', '.join(unknown)} (registered: {', '.join(list_methods())})")
    models = _split(args.models)
    out = Path(args.out or f"benchmarks/results/suite_{torch.device(device).type}_{time.strftime('%Y-%m-%d')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = json.loads(out.read_text()) if out.is_file() else {}
    machine = machine_record(device)
    doc.setdefault("started", machine["date"])
    doc.update(device=device, rounds=args.rounds, machine=machine, command=" ".join(["python", *sys.argv]))
    rows: list[dict] = doc.setdefault("rows", [])
    done = {row_key(r) for r in rows if "error" not in r}
    plan = [(m, meth, b, mode) for m in models for b in batches for mode in modes for meth in chosen]
    for i, (model, method, batch, mode) in enumerate(plan, 1):
        key = (model, method, batch, mode, precision)
        label = f"[{i}/{len(plan)}] {model} {method} batch {batch} {mode} {precision}"
        if key in done and not args.redo:
            print(f"{label}: already in {out}, skipped", flush=True)
            continue
        row = {"model": model, "method": method, "batch": batch, "mode": mode, "precision": precision}
        start = time.perf_counter()
        try:
            exp = bench_experiment(method, MODELS.get(model, model), setting(method, model))
            compile, compile_mode = MODES[mode]
            result = run_bench(exp, batch=batch, precision=precision, compile=compile, compile_mode=compile_mode, device=device,
                               rounds=args.rounds, warmup=args.warmup, iters=args.iters)
            row = {**result, **row}  # the row's key fields stay as planned
            print(f"{label}: speed-up {row['speedup']:.2f}x ({row['speedup_min']:.2f}-{row['speedup_max']:.2f}), "
                  f"bound {row['flops_bound']:.2f}x, efficiency {row['efficiency']:.2f}, {row['throughput_ips']:.1f} img/s "
                  f"(dense {row['dense_throughput_ips']:.1f}; spreads {row['throughput_spread']:.0%} / {row['dense_throughput_spread']:.0%}), "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
        except (UserError, RuntimeError, ValueError) as e:  # one row failing (e.g. a compile error) leaves the others
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"{label}: FAILED {row['error']}", flush=True)
        rows[:] = [r for r in rows if row_key(r) != key] + [row]
        _write(doc, out)
    _write(doc, out)
    print(f"results: {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
