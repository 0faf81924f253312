"""``<runs-dir>/dashboard.html``: every run of a runs folder on one static page (``rlhf dashboard``, and
rebuilt after every run).

From the top: the champion (the latest promoted run), each key metric over time (runs by their start,
promoted runs, the champion, unpromoted and failed runs each marked their own way), a table of every run
with its status, its promotion decision and why, its key metrics and a link to its report, and a run
picker that shows two runs side by side (``flows.compare``: metrics, config diff, data and backbone
digests, final sample tables). One file: the plots are inline PNG, the runs' data inline JSON and the
picker a few lines of plain script, so it opens from a shared drive, offline, with no server.
"""

from __future__ import annotations

import html
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from flows.compare import run_summary
from flows.figures import figures_html, to_png, write_page
from flows.glossary import meaning
from flows.page_parts import STYLE, cell
from flows.promotion import promoted_runs
from flows.report import describe, list_runs
from stages.io.artifacts import ArtifactError, strict_json
from stages.io.config import ConfigError
from stages.registry import STAGE_ORDER

DASHBOARD = "dashboard.html"
FAILED = ("failed", "crashed")


def write_dashboard(runs_dir: Path) -> Path:
    """Render ``runs_dir/dashboard.html`` from every run folder in it; return its path."""
    import matplotlib

    matplotlib.use("Agg")
    runs_dir = Path(runs_dir)
    summaries, unreadable = [], []
    for row in list_runs(runs_dir):
        try:
            summaries.append(run_summary(runs_dir / row["run_id"], row["status"]))
        except (ConfigError, ArtifactError, OSError, ValueError) as err:  # one bad folder must not hide the rest
            unreadable.append(f"{row['run_id']}: {err}")
    promoted = promoted_runs(runs_dir)
    champion = max(promoted, key=lambda row: row["at"])["run_id"] if promoted else None
    series = _key_series(summaries)
    figures = [_trend(summaries, stage, metric, champion) for stage, metric in series]
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
    head = (
        f"<h1>runs in {html.escape(str(runs_dir.resolve()))}</h1><p class='sub'>{len(summaries)} runs - "
        f"generated {generated} UTC - champion: "
        + (_report_link(champion) if champion else "none yet")
        + "</p>"
        + "".join(f"<p class='warning'>not shown, unreadable: {html.escape(text)}</p>" for text in unreadable)
    )
    body = [
        head,
        "<h2>key metrics over time</h2>",
        "<p class='meaning'>green: promoted; gold star: the champion; orange triangle: not promoted; grey: "
        "no gate; red cross: failed or crashed (the stages it finished)</p>",
        figures_html(figures) or "<p>no run has finished a stage yet</p>",
        "<h2>runs</h2>",
        _runs_table(summaries, series, champion),
        "<h2>compare two runs</h2>",
        _picker(summaries),
    ]
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>rlhf runs</title><style>{STYLE}</style>"
        f"</head><body>{''.join(body)}</body></html>"
    )
    return write_page(runs_dir / DASHBOARD, page)


TRENDS = 9  # plots at most: the gate's metrics first, then each stage's task score and accuracies
TREND_METRICS = ("task_score", "pair_accuracy", "reward_accuracy")


def rebuild_dashboard(runs_dir: Path) -> str:
    """``write_dashboard`` after a run: its path, or, as it must never fail the run, why it could not be drawn."""
    try:
        return str(write_dashboard(runs_dir))
    except Exception as err:  # a page is not worth a failed nightly run
        return f"(the dashboard could not be rebuilt: {type(err).__name__}: {err}; `rlhf dashboard` retries)"


def _key_series(summaries: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The (stage, metric) pairs the page follows: those the newest run's gate names, then each stage's
    ``TREND_METRICS`` that some run reports, in pipeline order; ``TRENDS`` at most."""
    found = {(stage, m) for run in summaries for stage, entry in run["stages"].items() for m in entry["metrics"]}
    gated = []
    for run in reversed(summaries):
        record = run["promotion"] or {}
        conditions = (record.get("gate") if record.get("by") == "manual" else record) or {}
        if conditions.get("conditions"):
            gated = [tuple(c["condition"].split(" ", 1)[0].split(".", 1)) for c in conditions["conditions"]]
            break
    usual = [(s, m) for s in STAGE_ORDER for m in TREND_METRICS if (s, m) in found]
    return list(dict.fromkeys(pair for pair in [*gated, *usual] if pair in found))[:TRENDS]


def _value(run: dict[str, Any], stage: str, metric: str) -> float | None:
    return (run["stages"].get(stage) or {}).get("metrics", {}).get(metric)


def _kind(run: dict[str, Any], champion: str | None) -> str:
    if run["run_id"] == champion:
        return "champion"
    if run["status"] in FAILED:
        return "failed"
    status = (run["promotion"] or {}).get("status") if run["finished"] else None
    return {"promoted": "promoted", "not promoted": "not promoted"}.get(status or "", "ungated")


_MARKERS: dict[str, dict[str, Any]] = {  # kind -> matplotlib style
    "promoted": {"marker": "o", "color": "#1a8a1a", "s": 40},
    "champion": {"marker": "*", "color": "#d4a000", "s": 220, "edgecolors": "black"},
    "not promoted": {"marker": "^", "color": "#e07000", "s": 50},
    "ungated": {"marker": "o", "color": "#999999", "s": 30},
    "failed": {"marker": "x", "color": "#c00000", "s": 60},
}


def _trend(summaries: list[dict[str, Any]], stage: str, metric: str, champion: str | None) -> tuple[str, str]:
    """One key metric over the runs' start times, each run marked by its kind (``_MARKERS``)."""
    import matplotlib.pyplot as plt

    title = f"{stage}.{metric}"
    known = meaning(stage, metric)
    points: list[tuple[float, float, str]] = []  # (start as a matplotlib date, value, kind)
    for run in summaries:
        value = _value(run, stage, metric)
        if value is not None:
            points.append((_date(run), float(value), _kind(run, champion)))
    fig, ax = plt.subplots(figsize=(5.2, 2.8))
    for run in summaries:  # a failed run without this metric: a red line at its start, so it is seen
        if run["status"] in FAILED and _value(run, stage, metric) is None:
            ax.axvline(_date(run), color="#c00000", linestyle=":", linewidth=1)
    ax.plot([p[0] for p in points], [p[1] for p in points], color="#bbbbbb", linewidth=1, zorder=1)
    for kind, style in _MARKERS.items():
        chosen = [p for p in points if p[2] == kind]
        if chosen:
            ax.scatter([p[0] for p in chosen], [p[1] for p in chosen], label=kind, zorder=2, **style)
    first, last = _date(summaries[0]), _date(summaries[-1])
    margin = (last - first) * 0.05 if last > first else 1 / 24  # a single run: an hour either side
    ax.set_xlim(first - margin, last + margin)  # every plot over the same time span
    ax.xaxis_date()
    ax.set_title(title + (f" ({known.unit})" if known and known.unit else ""), fontsize=9)
    fig.autofmt_xdate()
    ax.tick_params(labelsize=7)
    return title, to_png(fig)


def _date(run: dict[str, Any]) -> float:
    """The run's start as a matplotlib date."""
    import matplotlib.dates as mdates

    return float(mdates.date2num(datetime.strptime(run["started"], "%Y-%m-%d %H:%M:%S")))


def _runs_table(summaries: list[dict[str, Any]], series: list[tuple[str, str]], champion: str | None) -> str:
    head = "".join(f"<th>{html.escape(f'{s}.{m}')}</th>" for s, m in series)
    rows = []
    for run in reversed(summaries):  # newest first
        run_id = run["run_id"]
        star = " <b title='the champion'>&#9733; champion</b>" if run_id == champion else ""
        link = _report_link(run_id)
        values = "".join(cell(_value(run, s, m)) for s, m in series)
        decision = describe(run["promotion"], run["finished"]) if run["status"] not in FAILED else _failure(run)
        rows.append(
            f"<tr><td>{link}{star}</td><td>{run['started']}</td><td class='{run['status']}'>{run['status']}</td>"
            f"<td class='meaning decision'>{html.escape(decision)}</td>{values}</tr>"
        )
    return (
        f"<table><tr><th>run</th><th>started (UTC)</th><th>status</th><th>promotion</th>{head}</tr>"
        f"{''.join(rows)}</table>"
    )


def _report_link(run_id: str) -> str:
    """A link to the run's report, relative to the runs folder (the id quoted: it may hold ', # or %)."""
    return f"<a href='{html.escape(quote(run_id))}/report.html'>{html.escape(run_id)}</a>"


def _failure(run: dict[str, Any]) -> str:
    """Why a failed or crashed run stopped: its first such stage and that stage's error."""
    stage, entry = next((s, e) for s, e in run["stages"].items() if e["status"] in FAILED)
    return f"{stage} {entry['status']}: {entry['error'] or ''}"


def _picker(summaries: list[dict[str, Any]]) -> str:
    """Two selects and the comparison of the runs chosen, drawn by the script from the embedded runs (the
    URL ``#a=RUN&b=RUN`` chooses them, so a comparison can be linked)."""
    options = "".join(f"<option>{html.escape(run['run_id'])}</option>" for run in reversed(summaries))
    # Strict JSON (NaN -> null, which JSON.parse reads) with every "<" escaped: no text in it can end the
    # script element or open a comment that hides its end.
    runs = {run["run_id"]: _for_page(run) for run in summaries}
    data = json.dumps(strict_json(runs), allow_nan=False).replace("<", "\\u003c")
    return (
        f"<p>A <select id='run-a'>{options}</select> B <select id='run-b'>{options}</select></p>"
        f"<div id='comparison'></div><script id='runs' type='application/json'>{data}</script>"
        f"<script>{_SCRIPT}</script>"
    )


def _for_page(run: dict[str, Any]) -> dict[str, Any]:
    return {**run, "decision": describe(run["promotion"], run["finished"])}


# Draws flows.compare.compare's tables in the browser: metrics with the change, config keys that differ,
# digests (same or DIFFERENT), final samples prompt by prompt.
_SCRIPT = r"""
const runs = JSON.parse(document.getElementById('runs').textContent);
const esc = s => String(s ?? '').replace(/[&<>"']/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;',"'":'&#39;'}[c]));
const num = v => v === null || v === undefined ? '-' : String(Number(Number(v).toPrecision(4)));  // as %.4g
const table = (head, rows) => '<table><tr>' + head.map(h => '<th>' + esc(h) + '</th>').join('') + '</tr>' +
  rows.map(r => '<tr>' + r.map(c => '<td>' + c + '</td>').join('') + '</tr>').join('') + '</table>';
const stage = (run, name) => run.stages[name] || {status: 'absent', metrics: {}, digests: {}, samples: []};
function compare(a, b) {
  const stages = [...new Set([...Object.keys(a.stages), ...Object.keys(b.stages)])];
  const metrics = [], digests = [], samples = [];
  for (const s of stages) {
    const x = stage(a, s), y = stage(b, s);
    for (const m of [...new Set([...Object.keys(x.metrics), ...Object.keys(y.metrics)])].sort()) {
      const va = x.metrics[m], vb = y.metrics[m];
      const change = va !== undefined && vb !== undefined ? vb - va : null;
      metrics.push([esc(s + '.' + m), num(va), num(vb), change === null ? '-' : (change >= 0 ? '+' : '') + num(change)]);
    }
    for (const d of ['backbone_fingerprint', 'dataset_digest', 'config_digest', 'code_version', 'cache_key']) {
      if (!(d in x.digests) && !(d in y.digests)) continue;
      const same = x.digests[d] !== undefined && x.digests[d] === y.digests[d];
      digests.push([esc(s + '.' + d), same ? 'same' : '<b class="fail">DIFFERENT</b>', esc(x.digests[d] || '-'), esc(y.digests[d] || '-')]);
    }
    const theirs = Object.fromEntries(y.samples.map(r => [r.prompt, r]));
    const said = r => r ? esc(r.response) + (r.correct === null ? '' : (r.correct ? ' <span class="pass">correct</span>' : ' <span class="fail">wrong</span>')) + (r.reward === null ? '' : ' (reward ' + num(r.reward) + ')') : '-';
    for (const r of x.samples) samples.push([esc(s), '<span class="text">' + esc(r.prompt) + '</span>', said(r), said(theirs[r.prompt])]);
  }
  const keys = [...new Set([...Object.keys(a.config), ...Object.keys(b.config)])].sort().filter(k => a.config[k] !== b.config[k]);
  const config = keys.map(k => [esc(k), esc(a.config[k] ?? '-'), esc(b.config[k] ?? '-')]);
  return '<h3>A ' + esc(a.run_id) + ' (' + esc(a.status) + ', ' + esc(a.decision) + ')<br>B ' + esc(b.run_id) + ' (' + esc(b.status) + ', ' + esc(b.decision) + ')</h3>' +
    '<h3>metrics</h3>' + table(['stage.metric', 'A', 'B', 'B - A'], metrics) +
    '<h3>config: ' + config.length + ' keys differ</h3>' + table(['key', 'A', 'B'], config) +
    '<h3>what each stage was computed from</h3>' + table(['stage.digest', '', 'A', 'B'], digests) +
    '<h3>final samples</h3>' + table(['stage', 'prompt', 'A says', 'B says'], samples);
}
const pick = {a: document.getElementById('run-a'), b: document.getElementById('run-b')};
function draw() {
  document.getElementById('comparison').innerHTML = compare(runs[pick.a.value], runs[pick.b.value]);
  try {  // a link to this comparison; a browser may refuse it for a file:// page
    history.replaceState(null, '', '#a=' + encodeURIComponent(pick.a.value) + '&b=' + encodeURIComponent(pick.b.value));
  } catch (e) {}
}
const chosen = new URLSearchParams(location.hash.slice(1));
for (const side of ['a', 'b']) if (runs[chosen.get(side)]) pick[side].value = chosen.get(side);
if (!chosen.get('b') && pick.b.options.length > 1) pick.b.selectedIndex = 1;
pick.a.onchange = pick.b.onchange = draw;
if (pick.a.options.length) draw();
"""
