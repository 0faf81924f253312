"""``runs/<id>/report.html``: one self-contained page a person reads after a run.

From the top: the run (start, status, time), the promotion decision with every gate condition (this run's
value, the champion's, the threshold, the verdict), the stages' warnings, the held-out task score of every
stage, then a section per stage: its status and time, links to its log and artifact, its final metrics
as a table with units and meanings (``flows.glossary``), its training curves, and what its policy says
(``stages.io.samples``): the final evaluation's table beside the SFT reference's responses, and the
tables of a few logged steps. Plots are embedded as base64 PNG, so the file can be mailed or attached to
a Prefect artifact as is; no script, no network.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from flows.figures import X_KEYS, figures_html, to_png, write_page
from flows.page_parts import STYLE, decision_html, metrics_table, moment_title, moments, samples_table
from flows.run_dir import read_history, run_started
from stages.io.samples import SAMPLES_FILE, read_samples
from stages.registry import spec

STEP_TABLES = 4  # logged steps whose tables the page shows (evenly spaced); samples.jsonl keeps them all


def write_report_html(report: dict[str, Any], run_dir: Path) -> Path:
    """Render the report of ``rlhf report`` with its plots and samples into ``run_dir/report.html``."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    run_dir = Path(run_dir)
    stages = report["stages"]
    seconds = sum(entry["seconds"] or 0.0 for entry in stages.values())
    states = ", ".join(f"<span class='{e['status']}'>{html.escape(s)} {e['status']}</span>" for s, e in stages.items())
    head = (
        f"<h1>run {html.escape(report['run_id'])}</h1><p class='sub'>started {run_started(run_dir)} UTC - "
        f"{seconds:.1f} s in stages - {states}</p>"
    )
    promotion = "<h2>promotion</h2>" + decision_html(report.get("promotion"), report["finished"])
    body = [head, promotion, _warnings(stages), figures_html([_task_scores(report)])]
    body += [_stage_section(run_dir, stage, entry) for stage, entry in stages.items()]
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>run {html.escape(report['run_id'])}</title>"
        f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>"
    )
    return write_page(run_dir / "report.html", page)


def _warnings(stages: dict[str, Any]) -> str:
    found = "".join(
        f"<p class='warning'>WARNING: {html.escape(w)}</p>"
        for entry in stages.values()
        for w in entry["metrics"].get("warnings", [])
    )
    found += "".join(
        f"<p class='stopped'>{html.escape(stage)} stopped early at step {entry['metrics']['stopped_at_step']}: "
        f"{html.escape(entry['metrics']['stop_reason'])}</p>"
        for stage, entry in stages.items()
        if entry["metrics"].get("stopped_at_step") is not None
    )
    return found


def _stage_section(run_dir: Path, stage: str, entry: dict[str, Any]) -> str:
    """One stage: status, time and links; its metrics, curves and sample tables."""
    links = []
    if (run_dir / "logs" / f"{stage}.log").is_file():
        links.append(f"<a href='logs/{stage}.log'>log</a>")
    if entry["artifact"]:
        links.append(f"<a href='{stage}/'>artifact</a>")
        if (run_dir / stage / SAMPLES_FILE).is_file():
            links.append(f"<a href='{stage}/{SAMPLES_FILE}'>all samples</a>")
    seconds = f"{entry['seconds']:.1f} s" if entry["seconds"] is not None else ""
    parts = [
        f"<h2 id='{stage}'>{html.escape(stage)}</h2><p class='sub'><span class='{entry['status']}'>"
        f"{entry['status']}</span> {seconds} {' - '.join(links)}</p>"
    ]
    if entry.get("error"):
        parts.append(f"<p class='warning'>{html.escape(entry['error'])}</p>")
    if entry["metrics"]:
        parts.append(metrics_table(stage, entry["metrics"]))
    curves = figures_html([_curve(run_dir, stage, curve.key, curve.title) for curve in spec(stage).curves])
    samples = stage_samples(read_samples(Path(entry["artifact"])), spec(stage).step_key) if entry["artifact"] else ""
    parts.append(f"<div class='side'><div>{curves}</div><div>{samples}</div></div>")  # the samples beside the curves
    return "".join(parts)


def stage_samples(rows: list[dict[str, Any]], step_key: str) -> str:
    """A stage's sample tables: the final (and before-training) ones open, a few logged steps' folded."""
    if not rows:
        return ""
    found = moments(rows)
    steps = [m for m in found if m[0] == "step"]
    if len(steps) > STEP_TABLES:  # evenly spaced, the first and the last included
        steps = [steps[round(i * (len(steps) - 1) / (STEP_TABLES - 1))] for i in range(STEP_TABLES)]
    shown = [m for m in found if m[0] != "step"] + steps
    parts = ["<h3>what the model says</h3>"]
    for phase, step, group in shown:
        title = html.escape(moment_title(phase, step, step_key))
        table = samples_table(group)
        parts.append(
            f"<details><summary>{title}</summary>{table}</details>" if phase == "step" else f"<h4>{title}</h4>{table}"
        )
    total = sum(1 for m in found if m[0] == "step")
    if total > len(steps):
        parts.append(f"<p class='meaning'>{len(steps)} of {total} step tables shown; all in {SAMPLES_FILE}</p>")
    return "".join(parts)


def _curve(run_dir: Path, stage: str, key: str, title: str) -> tuple[str, str | None]:
    rows = [r for r in read_history(run_dir, stage) if key in r]
    if not rows:
        return title, None
    x_key = next((k for k in X_KEYS if k in rows[0]), None)
    xs = [r[x_key] for r in rows] if x_key else list(range(len(rows)))
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 2.6))
    ax.plot(xs, [r[key] for r in rows], marker=".")
    ax.set_title(title, fontsize=9)
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
