"""The HTML pieces a run's ``report.html`` and the runs dashboard share: the style, a stage's metrics as a
table with units and meanings (``flows.glossary``), a gate's decision with each condition, and a sample
table (``stages.io.samples``). Plain HTML and CSS, no script and no network: a page opens from a shared
drive, offline."""

from __future__ import annotations

import html
import json
from typing import Any

from flows.glossary import KEY_METRICS, meaning
from flows.report import condition_outcome, describe
from flows.run_dir import PROMOTED

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em 2em;color:#222;max-width:1500px}
h1{margin-bottom:.2em}h2{border-bottom:2px solid #ccd;padding-bottom:.2em;margin-top:1.6em}
.sub{color:#666;margin-top:0}
table{border-collapse:collapse;margin:.5em 0}
th{background:#eef;text-align:left}th,td{padding:.3em .8em;border-bottom:1px solid #ddd;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.text,td.prompt{white-space:pre-wrap;font-family:ui-monospace,monospace;max-width:28em}
.meaning{color:#555;font-size:.9em}
.banner{padding:.6em 1em;font-weight:bold;border-radius:4px;margin:.6em 0}
.promoted{background:#dfd;border:2px solid #0a0}.not-promoted{background:#fed;border:2px solid #c60}
.ungated{background:#f4f4f4;border:1px solid #bbb}.on-hold{background:#ffd;border:2px solid #aa0}
.warning{background:#fdd;border:2px solid #c00;padding:.5em;font-weight:bold}
.stopped{background:#eef;border:1px solid #66c;padding:.5em}
.pass{color:#070;font-weight:bold}.fail{color:#b00;font-weight:bold}.skip{color:#777;font-weight:bold}
.crashed,.failed{color:#b00;font-weight:bold}.completed,.cached{color:#070}.running{color:#a60}
figure{display:inline-block;margin:.5em 1em .5em 0}figcaption{font-size:.85em;color:#555}
details{margin:.4em 0}summary{cursor:pointer;color:#226}
.decision{min-width:22em}td.num,th{white-space:nowrap}
.side{display:flex;flex-wrap:wrap;gap:1.5em;align-items:flex-start}.side>div{flex:1 1 30em;min-width:0}
"""


def cell(value: Any) -> str:
    """One value for a table cell: numbers right-aligned with 4 significant digits, text escaped."""
    if isinstance(value, bool) or value is None:
        return f"<td>{'' if value is None else value}</td>"
    if isinstance(value, float):
        return f"<td class='num'>{value:.4g}</td>"
    if isinstance(value, int):
        return f"<td class='num'>{value:,}</td>"
    text = value if isinstance(value, str) else json.dumps(value)
    return f"<td>{html.escape(text)}</td>"


def metrics_table(stage: str, metrics: dict[str, Any]) -> str:
    """A stage's final metrics: name, value, unit and meaning, the key metrics (``KEY_METRICS``) first;
    warnings and early stopping are shown apart."""
    rows = []
    first = {name: i for i, name in enumerate(KEY_METRICS)}
    for name, value in sorted(metrics.items(), key=lambda item: (first.get(item[0], len(first)), item[0])):
        if name in ("warnings", "early_stopping", "stop_reason") or (name == "stopped_at_step" and value is None):
            continue
        known = meaning(stage, name)
        unit, text = (known.unit, known.text) if known else ("", "")
        rows.append(
            f"<tr><td><code>{html.escape(name)}</code></td>{cell(value)}<td>{html.escape(unit)}</td>"
            f"<td class='meaning'>{html.escape(text)}</td></tr>"
        )
    return "<table><tr><th>metric</th><th>value</th><th>unit</th><th>meaning</th></tr>" + "".join(rows) + "</table>"


def decision_html(record: dict[str, Any] | None, finished: bool) -> str:
    """The promotion decision as a banner, and the gate's conditions as a table: value, the champion's value
    and run where the condition names it, the threshold compared with, the verdict."""
    status = (record or {}).get("status") if finished else "on hold"
    css = {PROMOTED: "promoted", None: "ungated", "on hold": "on-hold"}.get(status, "not-promoted")
    banner = f"<div class='banner {css}'>{html.escape(describe(record, finished))}</div>"
    gate = (record or {}).get("gate") if (record or {}).get("by") == "manual" else record
    if not gate or not gate.get("conditions"):
        return banner
    rows = "".join(_condition_row(c) for c in gate["conditions"])
    return (
        banner + "<table><tr><th>gate condition</th><th>this run</th><th>champion</th><th>threshold</th>"
        f"<th>verdict</th><th>why</th></tr>{rows}</table>"
    )


def _condition_row(checked: dict[str, Any]) -> str:
    verdict = {True: ("pass", "pass"), False: ("fail", "FAIL"), None: ("skip", "not checked")}[checked["passed"]]
    champion = checked.get("champion")
    theirs = f"{champion['value']:.4g} ({champion['run_id']})" if champion and champion["value"] is not None else ""
    threshold = checked.get("threshold")
    why = checked.get("reason") or (condition_outcome(checked) if checked["passed"] is False else "")
    return (
        f"<tr><td><code>{html.escape(checked['condition'])}</code></td>{cell(checked['value'])}"
        f"<td>{html.escape(theirs)}</td>{cell(threshold)}<td class='{verdict[0]}'>{verdict[1]}</td>"
        f"<td class='meaning'>{html.escape(why)}</td></tr>"
    )


def samples_table(rows: list[dict[str, Any]]) -> str:
    """One sample table: prompt, the policy's response, answer and verdict, reward (with its parts), and the
    reference's response where the rows have one."""
    with_reference = any(row.get("reference_response") is not None for row in rows)
    with_reward = any(row.get("reward") is not None for row in rows)
    head = "<tr><th>prompt</th><th>response</th><th>finished</th><th>answer</th><th>correct</th>"
    head += "<th>reward</th>" if with_reward else ""
    head += "<th>SFT reference's response</th>" if with_reference else ""
    body = []
    for row in rows:
        parts = [
            f"{name.replace('_', ' ')} {row[name]:.4g}"
            for name in ("reward_model", "checker")
            if row.get(name) is not None and with_reward
        ]
        reward = ""
        if with_reward:
            shown = "" if row.get("reward") is None else f"{row['reward']:.4g}"
            reward = f"<td class='num'>{shown}<br><span class='meaning'>{html.escape(', '.join(parts))}</span></td>"
        correct = {True: "<td class='pass'>yes</td>", False: "<td class='fail'>no</td>", None: "<td></td>"}
        body.append(
            f"<tr><td class='prompt'>{html.escape(row['prompt'])}</td><td class='text'>{html.escape(row['response'])}"
            f"</td><td>{'yes' if row['finished'] else 'no'}</td><td>{html.escape(str(row.get('answer') or ''))}</td>"
            f"{correct[row.get('correct')]}{reward}"
            + (f"<td class='text'>{html.escape(row.get('reference_response') or '')}</td>" if with_reference else "")
            + "</tr>"
        )
    return f"<table>{head}</tr>{''.join(body)}</table>"


def moments(rows: list[dict[str, Any]]) -> list[tuple[str, int, list[dict[str, Any]]]]:
    """The rows grouped by the moment they were sampled at, in order: ``(phase, step, rows)``."""
    found: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in rows:
        found.setdefault((row["phase"], row["step"]), []).append(row)
    return [(phase, step, group) for (phase, step), group in found.items()]


def moment_title(phase: str, step: int, step_key: str = "step") -> str:
    return {"final": f"final evaluation (after {step_key} {step})", "before": "base model, before training"}.get(
        phase, f"after {step_key} {step}"
    )
