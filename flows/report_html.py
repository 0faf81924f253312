"""``runs/<id>/report.html``: one self-contained page with every stage's curves and the task scores.

Plots come from each stage's ``history.json`` and metrics; images are embedded as base64 PNG so the
file can be mailed or attached to a Prefect artifact as is.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from flows.figures import CURVES, X_KEYS, figures_html, to_png, write_page
from flows.report import describe
from flows.run_dir import PROMOTED, read_history


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
    warnings = "".join(
        f"<p class='warning'>WARNING: {html.escape(w)}</p>"
        for entry in report["stages"].values()
        for w in entry["metrics"].get("warnings", [])
    )
    warnings += "".join(
        f"<p class='stopped'>{html.escape(stage)} stopped early at step {entry['metrics']['stopped_at_step']}: "
        f"{html.escape(entry['metrics']['stop_reason'])}</p>"
        for stage, entry in report["stages"].items()
        if entry["metrics"].get("stopped_at_step") is not None
    )
    promotion = ""
    if "promotion" in report:
        status = (report["promotion"] or {}).get("status") if report["finished"] else "on hold"
        css = {PROMOTED: "promoted", None: "ungated"}.get(status, "not-promoted")  # not a stage's warning
        promotion = f"<p class='{css}'>{html.escape(describe(report['promotion'], report['finished']))}</p>"
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


def _curve(run_dir: Path, stage: str, key: str, title: str) -> tuple[str, str | None]:
    rows = [r for r in read_history(run_dir, stage) if key in r]
    if not rows:
        return title, None
    x_key = next((k for k in X_KEYS if k in rows[0]), None)
    xs = [r[x_key] for r in rows] if x_key else list(range(len(rows)))
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(xs, [r[key] for r in rows], marker=".")
    ax.set_title(title)
    ax.set_xlabel(x_key or "logged step")
    return title, to_png(fig)


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
    return title, to_png(fig)
