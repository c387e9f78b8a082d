"""``prunetune`` as users run it (subprocesses): bad input ends in one error line and exit code 2, recording nothing."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from ports import free_port

GOOD_CONFIG = """\
name: cli-test
method: {{name: dynamicvit, pruning_loc: [1, 3, 5]}}
model: {{name: vit_tiny_patch16_224, img_size: 32, patch_size: 4, depth: 6, embed_dim: 96, num_heads: 3, num_classes: 10}}
data: {{path: {data}, loader_workers: 0}}
train: {{epochs: 1, batch_size: 64}}
pretrain: {{epochs: 1, batch_size: 64}}
sweep: {{search_space: {space}, num_samples: 2}}
tracking: {{uri: "sqlite:///{track}/mlflow.db", experiment: cli}}
storage_path: runs
"""

BAD_SPACES = {
    "space_distribution": ("keep_ratio: {distribution: normal, low: 0.5, high: 0.9}\n", ["bad_space.yaml", "'keep_ratio'", "'normal'"]),
    "space_bounds": ("keep_ratio: {distribution: uniform, low: 0.9, high: 0.5}\n", ["bad_space.yaml", "'keep_ratio'", "low 0.9 > high 0.5"]),
    "space_parameter": ("drop_ratio: {distribution: uniform, low: 0.5, high: 0.9}\n", ["bad_space.yaml", "'drop_ratio'", "unknown parameter"]),
}


@dataclass
class Case:
    args: list[str]
    cwd: Path
    returncode: int = -1
    stdout: str = ""
    stderr: str = ""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def config(folder: Path, data: str | Path, space: str = "dynamicvit", text: str | None = None) -> str:
    """A config file in ``folder/cfg/`` tracking to ``folder/track/mlflow.db`` (the folder exists, the file not)."""
    (folder / "track").mkdir(parents=True, exist_ok=True)
    text = text if text is not None else GOOD_CONFIG.format(data=data, space=space, track=folder / "track")
    return str(write(folder / "cfg" / "exp.yaml", text))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def existing_db(tmp_path_factory) -> Path:
    """An MLflow sqlite store with one experiment and no sweep."""
    from orchestrator.tracking import Tracker

    path = tmp_path_factory.mktemp("db") / "mlflow.db"
    Tracker(f"sqlite:///{path}", "exists").experiment_id()
    return path


@pytest.fixture(scope="module")
def cases(tmp_path_factory, digits_root, existing_db) -> dict[str, Case]:
    """Every command of this file, run at once (each is a fresh interpreter importing torch: seconds apiece)."""
    root = tmp_path_factory.mktemp("cli")
    closed = f"http://127.0.0.1:{free_port()}"
    c: dict[str, Case] = {}

    def add(name: str, args: list[str]) -> None:
        c[name] = Case(args, root / name)
        c[name].cwd.mkdir(exist_ok=True)

    add("missing_config", ["validate", str(root / "missing_config" / "nope.yaml")])
    add("malformed_yaml", ["validate", str(write(root / "malformed_yaml" / "broken.yaml", "name: x\nmethod: {name: dynamicvit\n"))])
    bad_method = GOOD_CONFIG.replace("name: dynamicvit", "name: no_such_method")
    add("unknown_method", ["sweep", config(root / "unknown_method", digits_root, text=bad_method.format(data=digits_root, space="dynamicvit", track=root / "unknown_method" / "track"))])
    for name, (space, _) in BAD_SPACES.items():
        write(root / name / "cfg" / "spaces" / "bad_space.yaml", space)
        add(name, ["sweep", config(root / name, digits_root, space="spaces/bad_space.yaml")])
    add("validate_missing_data", ["validate", config(root / "validate_missing_data", "no_such_data")])
    add("sweep_missing_data", ["sweep", config(root / "sweep_missing_data", "no_such_data")])
    add("unreachable", ["sweep", config(root / "unreachable", digits_root), "--tracking-uri", closed.replace("//", "//user:hunter2@")])
    add("pareto_unknown_experiment", ["pareto", "--experiment", "nope", "--tracking-uri", f"sqlite:///{existing_db}"])
    add("pareto_no_db", ["pareto", "--experiment", "cli", "--tracking-uri", f"sqlite:///{root / 'pareto_no_db' / 'mlflow.db'}"])
    add("validate_ok", ["validate", config(root / "validate_ok", digits_root), "--set", "keep_ratio=0.6"])
    add("data", ["data", "digits", "--out", str(root / "data" / "digits"), "--img-size", "16"])
    add("methods", ["methods"])

    db_before = sha(existing_db)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_"))}

    def run(case: Case) -> None:
        proc = subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", *case.args], cwd=case.cwd, env=env,
            capture_output=True, text=True, timeout=120,
        )
        case.returncode, case.stdout, case.stderr = proc.returncode, proc.stdout, proc.stderr

    with ThreadPoolExecutor(max_workers=2) as pool:  # two at a time: the cores of a small CI runner
        list(pool.map(run, c.values()))
    assert sha(existing_db) == db_before, "a failed pareto altered the MLflow store"
    return c


def assert_user_error(case: Case, *words: str) -> str:
    """Exit code 2, exactly one stderr line ``prunetune: error: ...`` naming ``words``, and nothing recorded."""
    assert case.returncode == 2, (case.returncode, case.stderr[-2000:])
    lines = case.stderr.splitlines()
    assert len(lines) == 1, case.stderr[-2000:]
    assert lines[0].startswith("prunetune: error: ")
    assert case.stdout == ""  # nothing started (Ray, a sweep) before the error
    for w in words:
        assert w in lines[0], (w, lines[0])
    written = [p for p in case.cwd.rglob("*") if p.name.endswith(".db") or p.name in ("mlruns", "runs", "prunetune_runs")]
    assert written == [], written
    return lines[0]


def test_missing_config_file(cases):
    assert_user_error(cases["missing_config"], "nope.yaml", "does not exist")


def test_malformed_yaml(cases):
    assert_user_error(cases["malformed_yaml"], "broken.yaml", "not valid YAML")


def test_unknown_method(cases):
    assert_user_error(cases["unknown_method"], "'no_such_method'", "dynamicvit", "dense")


@pytest.mark.parametrize("name", list(BAD_SPACES))
def test_malformed_search_space(cases, name):
    assert_user_error(cases[name], *BAD_SPACES[name][1])


@pytest.mark.parametrize("command", ["validate", "sweep"])
def test_missing_data_folder(cases, command):
    case = cases[f"{command}_missing_data"]
    line = assert_user_error(case, "no_such_data", "does not exist")
    assert str(case.cwd / "cfg" / "no_such_data") in line  # resolved against the config file's folder
    assert list((case.cwd / "track").iterdir()) == []  # the sweep failed before opening the tracking store


def test_unreachable_tracking_uri(cases):
    case = cases["unreachable"]
    assert_user_error(case, "http://user:***@127.0.0.1:", "unreachable")
    assert "hunter2" not in case.stderr + case.stdout


def test_pareto_unknown_experiment(cases, existing_db):
    assert_user_error(cases["pareto_unknown_experiment"], "'nope'", "not found")


def test_pareto_missing_store(cases):
    case = cases["pareto_no_db"]
    assert_user_error(case, "mlflow.db", "does not exist")
    assert not (case.cwd / "mlflow.db").exists()


def test_validate_a_good_config(cases):
    case = cases["validate_ok"]
    assert case.returncode == 0, case.stderr[-2000:]
    assert "config ok: method dynamicvit" in case.stdout and "'train': 1437" in case.stdout
    assert "keep_ratio" in case.stdout and "dynamicvit.yaml" in case.stdout
    assert list((case.cwd / "track").iterdir()) == []  # validating records nothing


def test_data_digits(cases):
    case = cases["data"]
    assert case.returncode == 0, case.stderr[-2000:]
    assert "1437 train / 360 val" in case.stdout
    from orchestrator.data import check_image_folder

    assert check_image_folder(case.cwd / "digits") == {"train": 1437, "val": 360}


def test_methods(cases):
    case = cases["methods"]
    assert case.returncode == 0, case.stderr[-2000:]
    import methods

    heads = [line.split(" ", 1)[0] for line in case.stdout.splitlines() if line and not line.startswith(" ")]
    assert heads == methods.list_methods()  # every registered method, each once
    rows = {tuple(line.split()[:2]): line for line in case.stdout.splitlines() if line.startswith("  ")}
    # DynamicViT's keep ratio: the paper's default and the range of search_spaces/dynamicvit.yaml
    assert "uniform [0.5, 0.9]" in rows[("keep_ratio", "0.7")]
    assert "dynamicvit (needs_pretrained, needs_teacher)" in case.stdout


@pytest.mark.parametrize("args", [
    ["validate", "{missing}"], ["sweep", "{missing}"], ["sweep", "{broken}"], ["pipeline", "{broken}"],
    ["eval", "--config", "{missing}", "--checkpoint", "c.pt", "--data", "d"],
])
def test_a_missing_or_malformed_file_is_refused_before_torch_or_ray_is_imported(tmp_path, args):
    # Answered in a fraction of a second rather than the seconds their imports take.
    write(tmp_path / "broken.yaml", "name: x\nmethod: {name: dynamicvit\n")
    argv = [a.format(missing=tmp_path / "nope.yaml", broken=tmp_path / "broken.yaml") for a in args]
    script = (
        "import sys\nfrom orchestrator.cli import main\n"
        f"code = main({argv!r})\n"
        "print(code, sorted(m for m in ('torch', 'timm', 'ray', 'mlflow') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "2 []", proc.stdout + proc.stderr[-2000:]
    expected = "does not exist" if "{missing}" in args else "is not valid YAML at line 3"
    assert proc.stderr.startswith("prunetune: error: ") and expected in proc.stderr, proc.stderr


def test_only_the_command_line_process_skips_the_final_collection():
    # ``prunetune`` (argv None) freezes the collector's objects as it exits; an in-process call must not.
    script = (
        "import gc, sys\nfrom orchestrator import cli\n"
        "cli.main(['methods']); inprocess = gc.get_freeze_count()\n"
        "sys.argv = ['prunetune', 'methods']; cli.main(); print(inprocess, gc.get_freeze_count() > 1000, file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr.strip().splitlines()[-1] == "0 True", proc.stderr[-2000:]
