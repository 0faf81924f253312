"""``runs/<id>/report.html``: one self-contained page with every stage's curves and the task scores.

Plots come from each stage's ``history.json`` and metrics; images are embedded as base64 PNG so the
file can be mailed or attached to a Prefect artifact as is.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from flows.report import describe
from flows.run_dir import PROMOTED
from stages.registry import STAGES

# (stage, history key, title): the curves each stage declares in the registry, in pipeline order
CURVES = [(stage.name, curve.key, curve.title) for stage in STAGES for curve in stage.curves]
X_KEYS = tuple(dict.fromkeys(stage.step_key for stage in STAGES))


def write_report_html(report: dict[str, Any], run_dir: Path) -> Path:
    """Render the report of ``rlhf report`` with its plots into ``run_dir/report.html``."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    figures = [_curve(run_dir, stage, key, title) for stage, key, title in CURVES]
    figures.append(_task_scores(report))
    rows = "".join(
        f"<tr><td>{html.escape(stage)}</td><td>{entry['status']}</td><td>{entry['seconds']}</td>"
        f"<td><code>{html.escape(json.dumps(entry['metrics']))}</code></td></tr>"
        for stage, entry in report["stages"].items()
    )
    warnings = "".join(f"<p class='warning'>WARNING: {html.escape(w)}</p>"
                       for entry in report["stages"].values() for w in entry["metrics"].get("warnings", []))
    warnings += "".join(f"<p class='stopped'>{html.escape(stage)} stopped early at step {entry['metrics']['stopped_at_step']}: "
                        f"{html.escape(entry['metrics']['stop_reason'])}</p>"
                        for stage, entry in report["stages"].items() if entry["metrics"].get("stopped_at_step") is not None)
    promotion = ""
    if "promotion" in report:
        status = (report["promotion"] or {}).get("status") if report["finished"] else "on hold"
        css = {PROMOTED: "promoted", None: "ungated"}.get(status, "not-promoted")  # not a stage's warning
        promotion = (f"<p class='{css}'>"
                     f"{html.escape(describe(report['promotion'], report['finished']))}</p>")
    images = figures_html(figures)
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>run {html.escape(report['run_id'])}</title>"
        "<style>body{font-family:sans-serif;margin:2em}figure{display:inline-block;margin:1em}"
        "td{padding:.3em 1em;border-bottom:1px solid #ddd;vertical-align:top}"
        ".warning{background:#fdd;border:2px solid #c00;padding:.5em;font-weight:bold}"
        ".promoted{background:#dfd;border:2px solid #0a0;padding:.5em;font-weight:bold}"
        ".not-promoted{background:#fed;border:2px solid #c60;padding:.5em;font-weight:bold}.ungated{padding:.5em}"
        ".stopped{background:#eef;border:1px solid #66c;padding:.5em}</style></head><body>"
        f"<h1>run {html.escape(report['run_id'])}</h1>{promotion}{warnings}<table><tr><th>stage</th><th>status</th><th>seconds</th>"
        f"<th>metrics</th></tr>{rows}</table>{images}</body></html>"
    )
    return write_page(Path(run_dir) / "report.html", page)


def figures_html(figures: list[tuple[str, str | None]]) -> str:
    """(title, base64 PNG or None) pairs as inline figures; a figure without data is left out."""
    return "".join(f'<figure><img src="data:image/png;base64,{png}" alt="{html.escape(title)}">'
                   f"<figcaption>{html.escape(title)}</figcaption></figure>" for title, png in figures if png)


def write_page(out: Path, page: str) -> Path:
    """Write an HTML page atomically (a reader never sees half of it), also when several processes of one
    sweep write its report at once (each through a temporary file of its own)."""
    import uuid

    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(page)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _history(run_dir: Path, stage: str) -> list[dict[str, Any]]:
    path = Path(run_dir) / stage / "history.json"
    return json.loads(path.read_text()) if path.is_file() else []


def _curve(run_dir: Path, stage: str, key: str, title: str) -> tuple[str, str | None]:
    rows = [r for r in _history(run_dir, stage) if key in r]
    if not rows:
        return title, None
    x_key = next((k for k in X_KEYS if k in rows[0]), None)
    xs = [r[x_key] for r in rows] if x_key else list(range(len(rows)))
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(xs, [r[key] for r in rows], marker=".")
    ax.set_title(title)
    ax.set_xlabel(x_key or "logged step")
    return title, _png(fig)


def _task_scores(report: dict[str, Any]) -> tuple[str, str | None]:
    bars: dict[str, float] = {}
    for stage, entry in report["stages"].items():
        metrics = entry["metrics"]
        if stage == "sft" and "task_score_before" in metrics:
            bars["base"] = metrics["task_score_before"]
        if "task_score" in metrics:
            bars[stage] = metrics["task_score"]
    title = "held-out task_score per stage"
    if not bars:
        return title, None
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(list(bars), list(bars.values()), color="#4c72b0")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    return title, _png(fig)


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()
