"""A sweep's HTML report: the leaderboard, the metric against each swept setting, and the training curves
of the best trials overlaid (``<runs-dir>/sweeps/<name>/report.html``)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from flows.figures import CURVES, X_KEYS, figures_html, to_png, write_page
from flows.run_dir import read_history, sweep_dir

BEST_CURVES = 3  # trials whose curves are overlaid


def write_sweep_report(board: dict[str, Any], runs_dir: Path) -> Path:
    """Render ``board`` (``flows.sweep.leaderboard``) to HTML beside its ``leaderboard.json``."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    done = [row for row in board["trials"] if row["value"] is not None]
    figures = [_against(done, key, board["metric"]) for key in (done[0]["params"] if done else {})]
    stage = board["metric"].split(".")[0]
    figures += [
        _overlaid(done[:BEST_CURVES], Path(runs_dir), stage, key, title) for name, key, title in CURVES if name == stage
    ]
    rows = "".join(
        f"<tr><td>{rank}</td><td>{row['trial']}</td><td>{html.escape(_settings(row['params']))}</td>"
        f"<td>{row['value'] if row['value'] is not None else html.escape(row['state'])}</td>"
        f"<td>{row['seconds'] if row['seconds'] is not None else '-'}</td><td>{html.escape(row['run_id'] or '-')}</td></tr>"
        for rank, row in enumerate(board["trials"], start=1)
    )
    images = figures_html(figures)
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(board['sweep'])}</title>"
        "<style>body{font-family:sans-serif;margin:2em}figure{display:inline-block;margin:1em}"
        "td,th{padding:.3em 1em;border-bottom:1px solid #ddd;text-align:left}</style></head><body>"
        f"<h1>{html.escape(board['sweep'])}: {html.escape(board['metric'])} ({board['direction']})</h1>"
        "<table><tr><th>rank</th><th>trial</th><th>settings</th><th>metric</th><th>seconds</th><th>run</th></tr>"
        f"{rows}</table>{images}</body></html>"
    )
    return write_page(sweep_dir(runs_dir, board["sweep"]) / "report.html", page)


def _settings(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items())


def _against(rows: list[dict[str, Any]], key: str, metric: str) -> tuple[str, str | None]:
    """The metric of each finished trial against one swept setting (its values as categories, in order)."""
    title = f"{metric} against {key}"
    if not rows:
        return title, None
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(str(row["params"][key]) for row in rows))
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.scatter([labels.index(str(row["params"][key])) for row in rows], [row["value"] for row in rows])
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel(key)
    ax.set_ylabel(metric)
    ax.set_title(title)
    return title, to_png(fig)


def _overlaid(rows: list[dict[str, Any]], runs_dir: Path, stage: str, key: str, title: str) -> tuple[str, str | None]:
    """One curve of ``stage`` per trial, the best first."""
    import matplotlib.pyplot as plt

    title = f"{title}: best {len(rows)} trial(s)"
    fig, ax = plt.subplots(figsize=(5, 3))
    drawn = False
    for row in rows:
        points = [r for r in read_history(runs_dir / row["run_id"], stage) if key in r]
        if not points:
            continue
        x_key = next((k for k in X_KEYS if k in points[0]), None)
        xs = [r[x_key] for r in points] if x_key else list(range(len(points)))
        ax.plot(xs, [r[key] for r in points], marker=".", label=f"trial {row['trial']}: {_settings(row['params'])}")
        drawn = True
    if not drawn:
        plt.close(fig)
        return title, None
    ax.set_title(title)
    ax.legend(fontsize=6)
    return title, to_png(fig)
