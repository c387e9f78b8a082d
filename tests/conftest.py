"""Shared pytest fixtures.

``methods`` is imported first: on the CPU-only torch used in development it makes torchvision, and
so timm, importable (see ``methods/_compat.py``).
"""
from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

import methods  # noqa: F401  (must precede any timm import)
from methods import BackboneConfig, create_backbone
from ports import free_port

# 32 px images in 4 px patches: 64 patches + CLS, 6 blocks, 10 classes; milliseconds per forward on CPU.
TINY_VIT = BackboneConfig(
    name="vit_tiny_patch16_224", img_size=32, patch_size=4, depth=6, embed_dim=96, num_heads=3, num_classes=10,
)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under ``-n 2 --dist loadgroup`` (CI) the integration tests run on one xdist worker, in order,
    sharing that worker's one Ray and one MLflow server. The unit tests and the two-node cluster's
    tests (a Ray, PostgreSQL and MLflow of their own: their module marks them ``xdist_group("cluster")``)
    run on the other worker meanwhile, in the time the sweeps leave the cores idle; a sweep whose
    assertions read its timings and the cluster's sweep never run at once (``cores_to_itself`` in
    tests/integration/conftest.py). An integration test already in a group stays in it only (xdist
    joins every group a test names into one). Without xdist the marks do nothing."""
    for item in items:
        if item.get_closest_marker("integration") is not None and item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group("integration"))


@pytest.fixture
def make_tiny_vit() -> Callable[..., torch.nn.Module]:
    """Factory: ``make_tiny_vit(seed=0, **overrides)`` builds a fresh tiny timm ViT with seeded random weights."""

    def make(seed: int = 0, **overrides) -> torch.nn.Module:
        cfg = dataclasses.replace(TINY_VIT, **overrides)
        torch.manual_seed(seed)
        return create_backbone(cfg)

    return make


@pytest.fixture
def tiny_vit(make_tiny_vit) -> torch.nn.Module:
    """A fresh tiny timm ``VisionTransformer`` (seed 0): 32 px, patch 4, depth 6, C=96, 3 heads, 10 classes."""
    return make_tiny_vit(0)


@pytest.fixture
def rng() -> torch.Generator:
    """A CPU generator seeded with 0, for synthetic inputs independent of the global RNG."""
    return torch.Generator().manual_seed(0)


@pytest.fixture
def mlflow_tmp(tmp_path) -> str:
    """A fresh MLflow tracking URI: a sqlite file under ``tmp_path`` (MLflow 3.13+ refuses the old file store)."""
    return f"sqlite:///{tmp_path}/mlflow.db"


@pytest.fixture(scope="session")
def port_factory() -> Callable[[], int]:
    """``port_factory()`` gives a free loopback TCP port, for services the tests start."""
    return free_port


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 endpoint: ``moto.server`` in a subprocess on a free loopback port; yields its URL."""
    import requests

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(url, timeout=5)
                break
            except requests.RequestException:  # refused while starting, or slow to answer on a busy machine
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start (exit code {proc.poll()})") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


CHROMIUM = "/usr/bin/chromium"  # Debian's chromium (.ci/run installs it)


@pytest.fixture(scope="session")
def render_report(tmp_path_factory) -> Callable[..., dict]:
    """``render_report(path)``: open an HTML file in a real headless Chromium and summarise the DOM it
    rendered: ``traces`` (per plotly scatter trace, in legend order: its name, the marker points it
    drew, the vertices of its line), ``token_images`` and ``front_rows``, and the ``dom`` itself."""
    from html.parser import HTMLParser

    if not shutil.which(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install -y chromium; .ci/run does it)")

    class _Summary(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.stack: list[tuple[str, bool]] = []  # (tag, opens a scatter trace)
            self.traces: list[dict] = []
            self.legend: list[str] = []
            self.in_legend_text = False
            self.token_images = self.front_rows = 0

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            cls = (a.get("class") or "").split()
            opens = tag == "g" and "trace" in cls and "scatter" in cls
            if opens:
                self.traces.append({"points": 0, "line_vertices": 0})
            elif self.traces and any(t for _, t in self.stack) and tag == "path":
                if "point" in cls:
                    self.traces[-1]["points"] += 1
                if "js-line" in cls and a.get("d"):
                    self.traces[-1]["line_vertices"] += a["d"].count("L") + 1
            if tag == "img" and "token-image" in cls and (a.get("src") or "").startswith("data:image/png;base64,"):
                self.token_images += 1
            if tag == "tr" and "front-row" in cls:
                self.front_rows += 1
            self.in_legend_text = tag == "text" and "legendtext" in cls
            if tag not in ("img", "meta", "br", "input", "link", "hr"):  # HTML's void elements have no end tag
                self.stack.append((tag, opens))

        def handle_endtag(self, tag):
            if any(t == tag for t, _ in self.stack):
                while self.stack.pop()[0] != tag:
                    pass
            self.in_legend_text = False

        def handle_data(self, data):
            if self.in_legend_text:
                self.legend.append(data)

    def render(path) -> dict:
        profile = tmp_path_factory.mktemp("chromium")
        proc = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=10000",
             "--dump-dom", Path(path).resolve().as_uri()],
            capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        dom = re.sub(r"<script\b.*?</script>", "", proc.stdout, flags=re.S)  # plotly's embedded source is not the page
        summary = _Summary()
        summary.feed(dom)
        for trace, name in zip(summary.traces, summary.legend):
            trace["name"] = name
        return {"traces": summary.traces, "legend": summary.legend, "token_images": summary.token_images,
                "front_rows": summary.front_rows, "dom": dom}

    return render
