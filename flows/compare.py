"""Two runs side by side (``rlhf diff RUN_A RUN_B`` and the dashboard's run picker): each stage's final
metrics with the change, the configs' differences, what each stage was computed from (backbone, data,
code, config: the digests of its manifest, so "same data?" has an answer), and the final sample tables.

``run_summary`` is one run as the dashboard embeds it; ``compare`` works on two summaries, so the
terminal and the page show the same comparison (the page's script does in the browser what ``compare``
does here, on the same fields).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flows.report import list_runs
from flows.run_dir import CONFIG, read_promotion, read_stages, run_finished, run_started
from stages.io import artifacts
from stages.io.config import load_config
from stages.io.samples import read_samples

# What a stage was computed from, in its manifest (stages.io.provenance): equal digests, equal inputs.
DIGESTS = ("backbone_fingerprint", "dataset_digest", "config_digest", "code_version", "cache_key")


def run_summary(run_dir: Path, status: str | None = None) -> dict[str, Any]:
    """One run from its folder: id, start, status, promotion, each stage's status, numeric final metrics,
    digests and final sample table, and the config flattened to ``section.key`` values. ``status``: the
    run's overall status when the caller knows it (``flows.report.list_runs``)."""
    run_dir = Path(run_dir)
    stages = {}
    for stage, entry in read_stages(run_dir).items():
        manifest = artifacts.read_manifest(run_dir / stage) if entry["artifact"] else {}
        stages[stage] = {
            "status": entry["status"],
            "error": entry.get("error"),
            "metrics": {k: v for k, v in entry["metrics"].items() if _numeric(v)},
            "digests": {name: manifest[name] for name in DIGESTS if name in manifest},
            "samples": [row for row in read_samples(run_dir / stage) if row["phase"] == "final"]
            if entry["artifact"]
            else [],
        }
    if status is None:
        status = next((row["status"] for row in list_runs(run_dir.parent) if row["run_id"] == run_dir.name), "pending")
    return {
        "run_id": run_dir.name,
        "started": run_started(run_dir),
        "status": status,
        "finished": run_finished(run_dir),
        "promotion": read_promotion(run_dir),
        "stages": stages,
        "config": flat_config(run_dir),
    }


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def flat_config(run_dir: Path) -> dict[str, str]:
    """The run's resolved config as ``section.key -> value`` (values as JSON text), for diffs."""
    data = load_config(Path(run_dir) / CONFIG).model_dump(mode="json")
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else key, inner)
        else:
            flat[prefix] = json.dumps(value, sort_keys=True)

    walk("", data)
    return flat


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two ``run_summary``s side by side: ``metrics`` (stage, metric, a, b, change), ``config`` (the keys
    whose values differ), ``digests`` (stage, digest, a, b, same) and ``samples`` (each stage's final
    table, prompt by prompt)."""
    metrics = []
    for stage in _stages(a, b):
        ours, theirs = _stage(a, stage)["metrics"], _stage(b, stage)["metrics"]
        for name in sorted(set(ours) | set(theirs)):
            x, y = ours.get(name), theirs.get(name)
            change = y - x if x is not None and y is not None else None
            metrics.append({"stage": stage, "metric": name, "a": x, "b": y, "change": change})
    keys = sorted(set(a["config"]) | set(b["config"]))
    config = [
        {"key": k, "a": a["config"].get(k), "b": b["config"].get(k)}
        for k in keys
        if a["config"].get(k) != b["config"].get(k)
    ]
    digests = []
    for stage in _stages(a, b):
        ours, theirs = _stage(a, stage)["digests"], _stage(b, stage)["digests"]
        for name in DIGESTS:
            if name in ours or name in theirs:
                x, y = ours.get(name), theirs.get(name)
                digests.append({"stage": stage, "digest": name, "a": x, "b": y, "same": x == y and x is not None})
    samples = {}
    for stage in _stages(a, b):
        ours, theirs = _stage(a, stage)["samples"], _stage(b, stage)["samples"]
        if ours or theirs:
            samples[stage] = _paired(ours, theirs)
    return {
        "a": _headline(a),
        "b": _headline(b),
        "metrics": metrics,
        "config": config,
        "digests": digests,
        "samples": samples,
    }


def _stages(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return list(dict.fromkeys([*a["stages"], *b["stages"]]))


def _stage(run: dict[str, Any], stage: str) -> dict[str, Any]:
    return run["stages"].get(stage) or {"status": "absent", "error": None, "metrics": {}, "digests": {}, "samples": []}


def _headline(run: dict[str, Any]) -> dict[str, Any]:
    from flows.report import describe

    return {
        "run_id": run["run_id"],
        "started": run["started"],
        "status": run["status"],
        "promotion": describe(run["promotion"], run["finished"]),
    }


def _paired(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The two final tables joined on the prompt, in A's order, then B's prompts A lacks."""
    by_prompt = {row["prompt"]: row for row in theirs}
    rows = [{"prompt": row["prompt"], "a": row, "b": by_prompt.get(row["prompt"])} for row in ours]
    seen = {row["prompt"] for row in ours}
    rows += [{"prompt": row["prompt"], "a": None, "b": row} for row in theirs if row["prompt"] not in seen]
    return rows


def format_diff(diff: dict[str, Any]) -> str:
    """``compare``'s result as text for a terminal."""
    a, b = diff["a"], diff["b"]
    lines = [
        f"A  {a['run_id']}  started {a['started']}  {a['status']}  {a['promotion']}",
        f"B  {b['run_id']}  started {b['started']}  {b['status']}  {b['promotion']}",
        "",
        "metrics",
        f"  {'stage.metric':<40} {'A':>12} {'B':>12} {'B - A':>12}",
    ]
    for row in diff["metrics"]:
        lines.append(
            f"  {row['stage'] + '.' + row['metric']:<40} {_num(row['a']):>12} {_num(row['b']):>12} "
            f"{_num(row['change'], signed=True):>12}"
        )
    lines += ["", f"config ({len(diff['config'])} keys differ)"]
    lines += [f"  {row['key']}: {row['a']} -> {row['b']}" for row in diff["config"]]
    lines += ["", "what each stage was computed from"]
    for row in diff["digests"]:
        same = "same" if row["same"] else "DIFFERENT"
        lines.append(f"  {row['stage'] + '.' + row['digest']:<36} {same:<10} {row['a'] or '-'}  {row['b'] or '-'}")
    for stage, rows in diff["samples"].items():
        lines += ["", f"{stage}: final samples (A | B)"]
        for row in rows:
            lines.append(f"  {row['prompt']!r}")
            for side in ("a", "b"):
                sample = row[side]
                said = "-" if sample is None else f"{sample['response']!r}{_verdict(sample)}"
                lines.append(f"    {side.upper()}: {said}")
    return "\n".join(lines)


def _num(value: Any, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.4g}" if signed else f"{value:.4g}"


def _verdict(sample: dict[str, Any]) -> str:
    parts = [] if sample.get("correct") is None else ["correct" if sample["correct"] else "wrong"]
    if sample.get("reward") is not None:
        parts.append(f"reward {sample['reward']:.4g}")
    return f"  ({', '.join(parts)})" if parts else ""
