"""``prunetune bench`` on a tiny geometry: the JSON object, the table, and bad parameters in one line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from orchestrator import cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["model.img_size=32", "model.patch_size=4", "model.depth=4", "model.embed_dim=96", "model.num_heads=3"]
REQUIRED = {
    "speedup", "efficiency", "gflops", "dense_gflops", "throughput_ips", "dense_throughput_ips", "latency_ms", "dense_latency_ms",
    "latency_spread", "dense_latency_spread", "throughput_spread", "dense_throughput_spread", "speedup_spread",
    "speedup_min", "speedup_max", "flops_bound", "machine", "setting", "batch", "precision", "compile", "device",
}


def _bench(capsys, method: str, *args: str, sets: tuple[str, ...] = ()) -> tuple[int, str, str]:
    argv = ["bench", "--method", method, "--backbone", "vit_tiny_patch16_224", "--device", "cpu"]
    for s in (*TINY, *sets):
        argv += ["--set", s]
    rc = cli.main([*argv, *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _dense_macs(depth: int = 4, n: int = 65, c: int = 96, patch_in: int = 48, classes: int = 1000) -> int:
    """methods.md section 0: ``12 n C^2 + 2 n^2 C`` per block, plus the patch embedding and the head."""
    return depth * (12 * n * c * c + 2 * n * n * c) + (n - 1) * patch_in * c + c * classes


def test_bench_json_has_the_figures_and_their_relations(capsys):
    rc, out, err = _bench(capsys, "tome", "--batch", "4", "--rounds", "3", "--profile", "4", "--json", sets=("r=2",))
    assert rc == 0, err
    r = json.loads(out)
    assert REQUIRED <= set(r)
    assert r["setting"]["r"] == 2 and r["batch"] == 4 and r["precision"] == "fp32" and r["compile"] is False
    assert r["device"] == "cpu" and r["rounds"] == 3 and r["weights"] == "random"
    assert r["dense_gflops"] * 1e9 == pytest.approx(_dense_macs(), rel=0.05)
    assert r["gflops"] < r["dense_gflops"]  # merging 2 tokens per block removes work
    assert r["flops_bound"] == pytest.approx(r["dense_gflops"] / r["gflops"])
    assert r["efficiency"] == pytest.approx(r["speedup"] / r["flops_bound"])
    assert r["speedup_min"] <= r["speedup"] <= r["speedup_max"]
    # three rounds: the median round's figures, so images/s is the batch over the median latency
    assert r["throughput_ips"] == pytest.approx(4 * 1000 / r["latency_ms"])
    assert r["dense_throughput_ips"] == pytest.approx(4 * 1000 / r["dense_latency_ms"])
    assert all(r[k] >= 0 for k in REQUIRED if k.endswith("_spread"))
    assert r["machine"]["torch"] == torch.__version__ and r["machine"]["torch_threads"] == 1
    for ops in (r["profile"]["sparse"], r["profile"]["dense"]):  # the 4 costliest operators, costliest first
        assert len(ops) == 4 and all(o["op"].startswith("aten::") for o in ops)
        shares = [o["share"] for o in ops]
        assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9
    assert any(o["op"] in ("aten::addmm", "aten::mm", "aten::linear") for o in r["profile"]["dense"])  # a ViT is mostly matmuls
    assert r["compile_mode"] is None
    from orchestrator.bench import format_bench

    assert ", eager, cpu" in format_bench(r)
    assert ", compiled (reduce-overhead), cpu" in format_bench({**r, "compile": True, "compile_mode": "reduce-overhead"})
    assert ", compiled, cpu" in format_bench({**r, "compile": True, "compile_mode": "default"})
    # A small-batch GPU figure in eager (or default compiled) mode says it is launch-bound; CUDA graphs, a big batch or a CPU do not.
    gpu = {**r, "device": "cuda:0", "machine": {**r["machine"], "gpu": "some GPU"}}
    launch_note = "--compile reduce-overhead (CUDA graphs) takes the launches out"
    assert launch_note in format_bench(gpu) and launch_note in format_bench({**gpu, "compile": True, "compile_mode": "default"})
    assert launch_note not in format_bench({**gpu, "compile": True, "compile_mode": "reduce-overhead"})
    assert launch_note not in format_bench({**gpu, "batch": 256}) and launch_note not in format_bench(r)


def test_bench_table_for_people(capsys):
    rc, out, err = _bench(capsys, "dynamicvit", "--batch", "2", "--rounds", "1", "--iters", "3", sets=("keep_ratio=0.5", "pruning_loc=[1, 2, 3]"))
    assert rc == 0, err
    assert "dynamicvit on vit_tiny_patch16_224" in out and "batch 2" in out
    for word in ("latency (ms/batch)", "throughput (img/s)", "GFLOPs", "speed-up", "efficiency", "bound"):
        assert word in out, out


@pytest.mark.parametrize("sets, args, words", [
    (("keep_ratioo=0.5",), (), ("keep_ratioo", "dynamicvit")),  # not a parameter of the method
    (("keep_ratio=1.5",), (), ("keep_ratio",)),  # out of its range
    (("pruning_loc=[1, 2, 9]",), (), ("pruning_loc",)),  # cannot fit the 4-block backbone
    (("pruning_loc=[1, 2, 3]",), ("--batch", "0"), ("--batch",)),
    (("pruning_loc=[1, 2, 3]",), ("--compile", "fast"), ("compile_mode", "'fast'")),  # not a torch.compile mode
])
def test_bench_refuses_bad_input_in_one_line(capsys, sets, args, words):
    rc, out, err = _bench(capsys, "dynamicvit", *args, sets=sets)
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prunetune: error: "), err
    for w in words:
        assert w in lines[0]


def test_bench_refuses_an_unknown_method(capsys):
    rc, out, err = _bench(capsys, "nosuch")
    assert rc == 2 and "nosuch" in err and len(err.strip().splitlines()) == 1


def test_sweep_configs_take_the_measurement_options_and_a_ratio_objective():
    from orchestrator.config import ConfigError, Objective, apply_overrides, experiment_from_dict

    exp = experiment_from_dict({
        "method": "tome", "model": {"name": "vit_tiny_patch16_224"},
        "sweep": {"objectives": [{"metric": "val_top1", "mode": "max"}, {"metric": "speedup", "mode": "max"}]},
        "measure": {"precision": "bf16", "compile": True, "rounds": 5},
    })
    assert exp.measure.precision == "bf16" and exp.measure.compile is True and exp.measure.rounds == 5
    assert exp.sweep.objectives[1] == Objective("speedup", "max")
    assert apply_overrides(exp, {"measure.compile": False}).measure.compile is False
    with pytest.raises(ConfigError, match="precision"):
        apply_overrides(exp, {"measure.precision": "fp8"})
    assert apply_overrides(exp, {"measure.compile_mode": "reduce-overhead"}).measure.compile_mode == "reduce-overhead"
    with pytest.raises(ConfigError, match="compile_mode.*'fast'"):
        apply_overrides(exp, {"measure.compile_mode": "fast"})
    with pytest.raises(ConfigError, match="compile_mode 'reduce-overhead' needs measure.compile: true"):
        apply_overrides(exp, {"measure.compile": False, "measure.compile_mode": "reduce-overhead"})


def _benchmark(name: str):
    """A script of ``benchmarks/`` as a module."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"prunetune_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_suite_skips_rows_already_measured_and_writes_the_table(tmp_path, capsys):
    """A second run with the same --out measures nothing that is there (it would take minutes per DeiT row)."""
    suite = _benchmark("suite")
    row = {
        "model": "deit_tiny", "method": "dense", "batch": 1, "mode": "eager", "precision": "fp32",
        "gflops": 1.258, "flops_bound": 1.0, "throughput_ips": 50.0, "throughput_spread": 0.04,
        "dense_throughput_ips": 51.0, "dense_throughput_spread": 0.03, "speedup": 0.99, "speedup_min": 0.97,
        "speedup_max": 1.02, "efficiency": 0.99,
    }
    out = tmp_path / "suite.json"
    out.write_text(json.dumps({"rows": [row]}))
    rc = suite.main(["--models", "deit_tiny", "--batches", "1", "--modes", "eager", "--methods", "dense", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "[1/1] deit_tiny dense batch 1 eager fp32: already in" in printed
    doc = json.loads(out.read_text())
    assert doc["rows"] == [row] and doc["device"] == "cpu" and doc["machine"]["torch"] == torch.__version__
    table = out.with_suffix(".md").read_text()
    assert "| deit_tiny | dense | 1 | eager | fp32 | 1.26 | 1.00 | 50.0 ±4% | 51.0 ±3% | 0.99 (0.97-1.02) | 0.99 |" in table
    assert suite.setting("tome", "deit_base") == {"r": 13} and suite.setting("dynamicvit", "deit_tiny")["keep_ratio"] == 0.7
    # Rows measured again later (--redo) keep their own dates: the table names the span, not the file's first start.
    doc["rows"] = [{**row, "machine": {"date": "2026-11-22 13:49:31 UTC"}}, {**row, "batch": 32, "machine": {"date": "2026-11-22 20:08:28 UTC"}}]
    assert "rows measured 2026-11-22 13:49:31 UTC to 2026-11-22 20:08:28 UTC;" in suite.markdown(doc)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_startup_benchmark_counts_each_process_cpu_under_its_kind():
    """A child process spinning for 0.6 s of CPU is counted under its program, and Ray's process titles
    map to the kind each process is counted under."""
    import subprocess
    import sys

    startup = _benchmark("startup")
    assert startup._process_kind("ray::RayTrainWorker.execute") == "ray::RayTrainWorker"
    assert startup._process_kind("/usr/bin/python3 -u /x/ray/dashboard/agent.py --node-ip-address=1") == "agent"
    child = "import time\nt0 = time.process_time()\nwhile time.process_time() - t0 < 0.6: pass\n"
    cpu = startup.ProcessCpu(interval=0.05).start()
    # argv[0] names the child apart from every other Python process on the machine
    proc = subprocess.run(["prunetune-spin", "-c", child], executable=sys.executable, capture_output=True, text=True, timeout=60)
    spent = cpu.stop()
    assert proc.returncode == 0, proc.stderr
    assert 0.5 <= spent["prunetune-spin"] <= 1.5, spent  # the child's 0.6 s, and its interpreter's start-up
    assert cpu.started["prunetune-spin"] == 1
    # Titles: a pooled worker's raylet command line, then IDLE, then its actor, then a method call.
    assert startup.ProcessCpu._kind(None, "raylet", "python") == "raylet"
    assert startup.ProcessCpu._kind("raylet", "ray::IDLE", "ray::IDLE") == "ray::IDLE"
    assert startup.ProcessCpu._kind("ray::IDLE", "ray::RayTrainWorker", "ray::RayTrainWo") == "ray::RayTrainWorker"
    assert startup.ProcessCpu._kind("ray::RayTrainWorker", "ray::execute", "ray::execute._s") == "ray::RayTrainWorker"
    assert startup.ProcessCpu._kind("ray::RayTrainWorker", None, "ray::RayTrainWo") == "ray::RayTrainWorker"  # exiting: no command line
