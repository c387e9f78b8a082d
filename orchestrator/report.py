"""``prunetune report``: one self-contained, interactive HTML page per front, and the sweep's ``report.html``.

The page shows accuracy against the cost objective (latency by default) with one plotly trace per
method (every finished run one point; hover: method, searched parameters, metrics, run id; a click
opens the run in MLflow's UI when the tracking URI is a server), the combined Pareto front as a
line, the dense reference run as a star, and a table of the front. For each front model of a token
method (``SparsityMethod.token_trace``) it shows which patches every token stage keeps (dropped
ones greyed) or merges (each group of merged patches in one colour) on the first validation images,
from the trial's checkpoint (or, for a training-free trial, the dense weights) rebuilt as
``prunetune eval`` does. plotly's JavaScript is embedded, so the file works offline.

Every sweep logs the page as ``report.html`` on its parent run (beside ``pareto_front.png``);
building it never fails a sweep (a warning instead).
"""
from __future__ import annotations

import base64
import html
import io
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Sequence
from urllib.parse import urlparse

from .fronts import FrontReport, Selection, compare, read_selection, usable
from .tracking import REFERENCE_ROLE, Tracker, _front_figure, redact

__all__ = ["TokenGrid", "build_html", "front_figure", "token_grids", "write_report", "log_sweep_report", "run_url"]

_logger = logging.getLogger(__name__)

REPORT_ARTIFACT = "report.html"
_METRICS_SHOWN = ("val_top1", "val_top5", "latency_ms", "speedup", "throughput_ips", "gflops")
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")


@dataclass
class TokenGrid:
    """The token stages of one front model on a few validation images (PNG bytes per cell)."""

    run_id: str
    method: str
    params: dict[str, Any]
    stage_labels: list[str]
    rows: list[list[bytes]] = field(default_factory=list)  # per image: the input, then one PNG per stage
    image_names: list[str] = field(default_factory=list)
    stages: list[Any] = field(default_factory=list)  # the ``TokenStage``s drawn (tokens of every image)


# ---- the scatter ---------------------------------------------------------------------------------


def axes(objectives: Sequence[tuple[str, str]]) -> tuple[str, str]:
    """(x, y): accuracy (``val_top1``, else the first objective) up, the cost objective across."""
    metrics = [m for m, _ in objectives]
    y = "val_top1" if "val_top1" in metrics or len(metrics) < 2 else metrics[0]
    x = next((m for m in metrics if m != y), "latency_ms")
    return x, y


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page in MLflow's UI when the tracking URI is a server, else None."""
    if urlparse(tracking_uri).scheme not in ("http", "https") or not experiment_id:
        return None
    return f"{redact(tracking_uri).rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _hover(row: dict) -> str:
    lines = [f"<b>{html.escape(row.get('method') or row.get('role', ''))}</b> {html.escape(row.get('run_name', ''))}"]
    lines += [f"{html.escape(k)} = {html.escape(_fmt(v))}" for k, v in row.get("params", {}).items()]
    lines += [f"{k}: {_fmt(row['metrics'][k])}" for k in _METRICS_SHOWN if k in row.get("metrics", {})]
    lines.append(f"run {row['run_id']}" + (f" · sweep {html.escape(row['sweep'])}" if row.get("sweep") else ""))
    return "<br>".join(lines)


def front_figure(report: FrontReport, rows: Sequence[dict], tracking_uri: str = ""):
    """The plotly figure: finished runs per method, the front as a line, the dense reference as a star."""
    import plotly.graph_objects as go

    x_key, y_key = axes(report.objectives)
    valid, _ = usable(rows, report.objectives)
    valid = [r for r in valid if x_key in r["metrics"] and y_key in r["metrics"]]
    fig = go.Figure()

    def points(rs, name, **style):
        rs = sorted(rs, key=lambda r: (r["metrics"][x_key], r["run_id"]))
        fig.add_trace(go.Scatter(
            x=[r["metrics"][x_key] for r in rs], y=[r["metrics"][y_key] for r in rs], name=name,
            text=[_hover(r) for r in rs], hovertemplate="%{text}<extra></extra>",
            customdata=[[r["run_id"], run_url(tracking_uri, r.get("experiment_id", ""), r["run_id"]) or ""] for r in rs],
            **style,
        ))

    trials = [r for r in valid if r.get("role") != REFERENCE_ROLE]
    for i, method in enumerate(sorted({r.get("method", "") for r in trials})):
        points([r for r in trials if r.get("method", "") == method], method or "trials", mode="markers",
               marker={"size": 9, "color": _PALETTE[i % len(_PALETTE)], "symbol": i % 8, "line": {"width": 1, "color": "#333"}})
    front = [r for r in report.front if x_key in r["metrics"] and y_key in r["metrics"]]
    if front:
        points(front, "Pareto front", mode="lines", line={"color": "crimson", "width": 2})
    ref = [r for r in valid if r.get("role") == REFERENCE_ROLE]
    if ref:
        points(ref, "dense reference", mode="markers",
               marker={"size": 18, "symbol": "star", "color": "gold", "line": {"width": 1, "color": "#333"}})
    label = {"val_top1": "val top-1 (%)", "latency_ms": "latency (ms, batch 1)", "gflops": "GFLOPs", "speedup": "speed-up vs dense",
             "throughput_ips": "throughput (images/s)"}
    fig.update_layout(
        xaxis_title=label.get(x_key, x_key), yaxis_title=label.get(y_key, y_key), template="plotly_white", height=560,
        hoverlabel={"align": "left"}, legend={"title": "click a point to open its MLflow run" if tracking_uri.startswith("http") else ""},
        title="objectives: " + ", ".join(f"{m} ({d})" for m, d in report.objectives),
    )
    return fig


# ---- token stages ----------------------------------------------------------------------------------


def _patch_png(image, token, grid: tuple[int, int], scale: int) -> bytes:
    """``image`` (HxWx3 uint8) with the patches out of the sequence greyed and merged groups tinted."""
    import numpy as np
    from PIL import Image

    img = image.astype(np.float32)
    gh, gw = grid
    ph, pw = img.shape[0] // gh, img.shape[1] // gw
    out = img.copy()
    if token is not None:
        counts = np.bincount(token[token >= 0], minlength=1) if (token >= 0).any() else np.zeros(1, int)
        for p, t in enumerate(token.tolist()):
            r, c = divmod(p, gw)
            cell = out[r * ph:(r + 1) * ph, c * pw:(c + 1) * pw]
            if t < 0:
                cell[:] = 0.25 * cell + 0.75 * 200.0  # dropped or waiting: greyed out
            elif counts[t] > 1:  # merged: tinted with the group's colour
                rgb = np.array([int(_PALETTE[t % len(_PALETTE)][i:i + 2], 16) for i in (1, 3, 5)], np.float32)
                cell[:] = 0.45 * cell + 0.55 * rgb
    pil = Image.fromarray(out.clip(0, 255).round().astype("uint8")).resize((img.shape[1] * scale, img.shape[0] * scale), Image.NEAREST)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def _row_experiment(run) -> Any:
    """A trial's typed config from its MLflow params: its method's fields, ``model.*``, ``data.*`` and
    ``storage_path`` (device-dependent settings, SPViT's latency-targeted schedule, are resolved again
    by ``method.resolve`` on this machine, from the cached tables when they match, as ``prunetune eval`` does)."""
    import yaml

    from methods import get_method

    from .config import experiment_from_dict

    params = run.data.params
    name = params.get("method") or run.data.tags.get("method", "")
    fields = set(get_method(name).config_cls.field_names())

    def value(text: str) -> Any:
        if text == "None":
            return None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError:
            return text

    data: dict[str, Any] = {"method": {"name": name, **{k: value(v) for k, v in params.items() if k in fields}}}
    if params.get("storage_path"):  # where the trial's cached measurements live (SPViT's latency tables)
        data["storage_path"] = params["storage_path"]
    for key, text in params.items():
        section, _, rest = key.partition(".")
        if section in ("model", "data") and rest:
            node = data.setdefault(section, {})
            *parents, leaf = rest.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value(text)
    return experiment_from_dict(data, where=f"run {run.info.run_id}")


def token_grids(tracking_uri: str, rows: Sequence[dict], images: int = 4, device: str = "cpu", scale: int = 4) -> list[TokenGrid]:
    """For each row (front runs) of a token method: its token stages on the first ``images``
    validation images (sorted by path), the model rebuilt from the run's checkpoint (its
    ``checkpoint_uri`` tag) or, for a trial that trained nothing, from the dense weights."""
    import copy
    from dataclasses import replace

    import numpy as np
    import torch

    from methods import SparsityMethod, create_backbone, get_method
    from methods.checkpoint import load_method_checkpoint

    from . import loop, storage
    from .data import build_val_dataset
    from .worker import STATE_FILE

    grids = []
    tracker = Tracker(tracking_uri, "")
    dev = torch.device(device)
    for row in rows:
        if row.get("role") != "trial":
            continue
        try:
            method = get_method(row.get("method", ""))
        except KeyError:
            continue
        if type(method).token_trace is SparsityMethod.token_trace:
            continue  # a method that does not change the tokens: nothing to show
        run = tracker.get_run(row["run_id"])
        exp = _row_experiment(run)
        checkpoint = run.data.tags.get("checkpoint_uri")
        epochs = int(run.data.params.get("train.epochs", "0") or 0)
        if not checkpoint and (epochs > 0 or not exp.model.pretrained):
            _logger.warning("report: run %s has no checkpoint (tag checkpoint_uri); its tokens are not shown", row["run_id"])
            continue
        weights = None if checkpoint else str(storage.fetch(exp.model.pretrained))  # training-free: the dense weights
        base = create_backbone(replace(exp.model, pretrained=weights))
        cfg = method.resolve(exp.method_config, copy.deepcopy(base), dev, loop.cache_dir(exp))
        model = method.build_model(cfg, base)
        if checkpoint:
            state = storage.fetch(storage.join(checkpoint, STATE_FILE))
            load_method_checkpoint(method, cfg, model, state, "prunetune")
        model.to(dev).eval()
        img = base.patch_embed.img_size
        val = build_val_dataset(exp.data, img[0])
        order = sorted(range(len(val.samples)), key=lambda i: val.samples[i][0])[:images]
        batch = torch.stack([val[i][0] for i in order]).to(dev)
        stages = method.token_trace(model, batch)
        if not stages:
            continue
        mean = torch.tensor(exp.data.mean, dtype=batch.dtype).view(1, 3, 1, 1)
        std = torch.tensor(exp.data.std, dtype=batch.dtype).view(1, 3, 1, 1)
        shown = ((batch.cpu() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        grid_shape = tuple(int(g) for g in base.patch_embed.grid_size)
        grid = TokenGrid(row["run_id"], method.name, dict(row.get("params", {})), [s.label for s in stages], stages=stages)
        for b in range(len(order)):
            cells = [_patch_png(shown[b], None, grid_shape, scale)]
            cells += [_patch_png(shown[b], s.token[b].cpu().numpy().astype(np.int64), grid_shape, scale) for s in stages]
            grid.rows.append(cells)
            grid.image_names.append(val.samples[order[b]][0].rsplit("/", 2)[-2] + "/" + val.samples[order[b]][0].rsplit("/", 1)[-1])
        grids.append(grid)
    return grids


# ---- the page ------------------------------------------------------------------------------------


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _front_table(report: FrontReport, tracking_uri: str) -> str:
    if not report.front:
        return "<p>The front is empty: no run finished with every objective measured.</p>"
    metrics = [k for k in dict.fromkeys([m for m, _ in report.objectives] + list(_METRICS_SHOWN)) if any(k in r["metrics"] for r in report.front)]
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ["run", "sweep", "method", *metrics, "params"])
    body = []
    for r in report.front:
        url = run_url(tracking_uri, r.get("experiment_id", ""), r["run_id"])
        rid = html.escape(r["run_id"][:8])
        link = f'<a href="{html.escape(url)}" target="_blank">{rid}</a>' if url else rid
        params = " ".join(f"{html.escape(k)}={html.escape(_fmt(v))}" for k, v in r.get("params", {}).items())
        cells = [link, html.escape(r.get("sweep", "")), html.escape(r.get("method", ""))]
        cells += [_fmt(r["metrics"][k]) if k in r["metrics"] else "-" for k in metrics] + [params]
        body.append("<tr class=\"front-row\">" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table class=\"front\"><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _grids_html(grids: Sequence[TokenGrid]) -> str:
    if not grids:
        return ""
    out = ["<h2>What the front models keep</h2>",
           "<p>Per front model of a token method, on the first validation images: the input, then the tokens at each stage of "
           "the really pruned (eval-mode) model. Greyed patches are out of the sequence (dropped, or waiting out the stage); "
           "patches in one colour were merged into one token.</p>"]
    for g in grids:
        params = ", ".join(f"{html.escape(k)}={html.escape(_fmt(v))}" for k, v in g.params.items())
        head = "".join(f"<th>{html.escape(h)}</th>" for h in ["image", "input", *g.stage_labels])
        rows = []
        for name, cells in zip(g.image_names, g.rows):
            imgs = "".join(f'<td><img class="token-image" alt="" src="{_data_uri(c)}"></td>' for c in cells)
            rows.append(f"<tr><td>{html.escape(name)}</td>{imgs}</tr>")
        out.append(
            f'<div class="tokens" data-run-id="{html.escape(g.run_id)}"><h3>{html.escape(g.method)} · run {html.escape(g.run_id[:8])}'
            f"</h3><p>{params}</p><table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
        )
    return "\n".join(out)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: .5em 0 1.5em; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 6px; text-align: left; vertical-align: middle; }
th { background: #f4f4f4; }
.meta { color: #555; font-size: 14px; }
.tokens img { image-rendering: pixelated; display: block; }
"""

_CLICK_JS = """
var plot = document.getElementById('{plot_id}');
plot.on('plotly_click', function (data) {
  var url = data.points[0].customdata && data.points[0].customdata[1];
  if (url) { window.open(url, '_blank'); }
});
"""


def build_html(report: FrontReport, rows: Sequence[dict], tracking_uri: str = "", grids: Sequence[TokenGrid] = (), title: str = "") -> str:
    """The whole page (plotly's JavaScript embedded: it works offline)."""
    fig = front_figure(report, rows, tracking_uri)
    plot = fig.to_html(full_html=False, include_plotlyjs=True, div_id="front-plot", post_script=_CLICK_JS,
                       config={"displaylogo": False, "responsive": True})
    valid, _ = usable(rows, report.objectives)
    sweeps = ", ".join(f"{html.escape(s['name'])} ({s['run_id'][:8]})" for s in report.sweeps)
    hv = "-" if report.hypervolume is None else f"{report.hypervolume:.6g}"
    ref = ", ".join(f"{html.escape(m)} {_fmt(v)}" for m, v in report.reference.items()) or "none"
    devices = "; ".join(report.devices) or "not recorded"
    mixed = "<p><b>MIXED DEVICES (asked for): latencies across them do not compare.</b></p>" if len(report.devices) > 1 else ""
    title = title or "prunetune report: " + ", ".join(report.experiments)
    meta = {"finished_runs": len(valid), "front": [r["run_id"] for r in report.front], "objectives": report.objectives}
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class="meta">sweeps: {sweeps or '-'} · {len(valid)} finished runs, {len(report.ignored)} ignored (not finished or not measured) ·
front: {len(report.front)} runs, hypervolume {hv} (reference {ref}) · device: {html.escape(devices)}
{' · tracking: ' + html.escape(redact(tracking_uri)) if tracking_uri else ''}</p>
{mixed}
{plot}
<h2>Pareto front</h2>
{_front_table(report, tracking_uri)}
{_grids_html(grids)}
<script type="application/json" id="prunetune-report">{html.escape(json.dumps(meta))}</script>
</body></html>
"""


def write_report(
    tracking_uri: str, selection: Selection, report: FrontReport, out: str | None = None, png: str | None = None,
    images: int = 4, tokens: bool = True,
) -> str:
    """Build the page (token stages of the front models unless ``tokens`` is False); write it to
    ``out`` and the matplotlib PNG to ``png`` when given. Returns the HTML."""
    grids = token_grids(tracking_uri, report.front, images) if tokens and images > 0 else []
    page = build_html(report, selection.rows, tracking_uri, grids)
    if out:
        with open(out, "w", encoding="utf-8") as f:
            f.write(page)
    if png:
        valid, _ = usable(selection.rows, report.objectives)
        _front_figure(report.front, valid, report.objectives).savefig(png)
    return page


def log_sweep_report(tracking_uri: str, parent_id: str, images: int = 4) -> bool:
    """Log ``report.html`` on the sweep's parent run; any failure is a warning, never an error."""
    try:
        selection = read_selection(tracking_uri, sweeps=[parent_id])
        report = compare(selection, mixed_devices=True)
        page = write_report(tracking_uri, selection, report, images=images)
        Tracker(tracking_uri, "").client.log_text(parent_id, page, REPORT_ARTIFACT)
        return True
    except Exception as e:  # noqa: BLE001  (the sweep's records are complete without the report)
        _logger.warning("sweep run %s: the HTML report could not be built (%s: %s); the sweep is unaffected", parent_id, type(e).__name__, e)
        return False
