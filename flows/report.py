"""The result of a run, from its folder only: status, seconds, metrics and artifact of every stage, its
promotion; as a dict (``run_report``), one row per run (``list_runs``) or lines for a person (``format_report``,
``describe``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flows.run_dir import (
    CONFIG,
    CRASHED,
    PROMOTED,
    RUNNING,
    read_promotion,
    read_stages,
    read_status,
    read_trial,
    run_finished,
    run_started,
)
from stages.io import artifacts
from stages.registry import STAGE_ORDER

HEADLINE_METRICS = (
    "task_score_before",
    "task_score_sft",
    "task_score",
    "pair_accuracy",
    "reward_margin",
    "policy_reward",
    "train_loss",
)


def run_report(run_dir: Path) -> dict[str, Any]:
    """``{"run_id", "stages": {name: {"status", "seconds", "metrics", "artifact"}}, "finished", "promotion"}``
    from disk only; ``finished``: every stage begun is completed or cached (``flows.run_dir.run_finished``)."""
    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir():
        raise artifacts.ArtifactError(f"{run_dir}: no such run")
    return {
        "run_id": run_dir.name,
        "stages": read_stages(run_dir),
        "finished": run_finished(run_dir),
        "promotion": read_promotion(run_dir),
    }


def list_runs(runs_dir: Path) -> list[dict[str, Any]]:
    """One row per run folder: id, overall status, stages, start time (UTC) and summed stage seconds."""

    rows = []
    for run_dir in sorted(Path(runs_dir).glob(f"*/{CONFIG}")):
        run_dir = run_dir.parent
        status = read_status(run_dir)
        states = {entry["status"] for entry in status.values()}
        overall = next((s for s in ("failed", CRASHED, RUNNING) if s in states), "completed" if status else "pending")
        rows.append(
            {
                "run_id": run_dir.name,
                "status": overall,
                "stages": sorted(status, key=STAGE_ORDER.index),
                "promotion": (read_promotion(run_dir) or {}).get("status", "-") if overall == "completed" else "-",
                **_sweep_of(run_dir),
                "started": run_started(run_dir),
                "seconds": sum(entry.get("seconds") or 0.0 for entry in status.values()),
            }
        )
    return sorted(rows, key=lambda row: row["started"])


def _sweep_of(run_dir: Path) -> dict[str, Any]:
    """``{"sweep", "trial"}`` of a run started by ``rlhf sweep`` (None for others)."""
    trial = read_trial(run_dir)
    return {"sweep": trial.get("sweep"), "trial": trial.get("trial")}


def format_report(report: dict[str, Any]) -> str:
    """A short human summary: one line per stage with its headline metrics."""
    lines = [f"run {report['run_id']}"]
    for stage, entry in report["stages"].items():
        metrics = entry["metrics"]
        shown = ", ".join(
            f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items() if k in HEADLINE_METRICS
        )
        seconds = f"{entry['seconds']:.1f}s" if entry["seconds"] is not None else "-"
        lines.append(f"  {stage:<7} {entry['status']:<10} {seconds:>8}  {shown or entry.get('error', '')}")
        for warning in metrics.get("warnings", []):
            lines.append(f"          WARNING: {warning}")
        if metrics.get("stopped_at_step") is not None:
            lines.append(f"          stopped early at step {metrics['stopped_at_step']}: {metrics['stop_reason']}")
        if entry["artifact"]:
            lines.append(f"          artifact: {entry['artifact']}")
    if "promotion" in report:
        lines.append(f"  promotion: {describe(report['promotion'], report['finished'])}")
    return "\n".join(lines)


def describe(record: dict[str, Any] | None, finished: bool = True) -> str:
    """A promotion record in one line, for reports, ``rlhf promote`` and Prefect's UI; a promotion of a run
    with an unfinished stage is on hold."""
    if record is not None and record["status"] == PROMOTED and not finished:
        return describe(record) + " - on hold: a stage has not finished (`rlhf resume` finishes it)"
    if record is None:
        return "no gate (not promoted)"
    if record["by"] == "manual":
        return f"promoted by {record['approved_by']} at {record['at']}" + (
            f": {record['reason']}" if record.get("reason") else ""
        )
    unchecked = [c for c in record["conditions"] if c["passed"] is None]
    skipped = "; not checked: " + "; ".join(f"{c['condition']} ({c['reason']})" for c in unchecked) if unchecked else ""
    if record["status"] == PROMOTED:
        total = len(record["conditions"])
        passed = f"all {total} conditions passed" if not unchecked else f"{total - len(unchecked)} of {total} passed"
        return f"promoted by its gate ({passed}{skipped})"
    failed = "; ".join(condition_outcome(c) for c in record["conditions"] if c["passed"] is False)
    return f"not promoted: failed {failed}{skipped}"


def condition_outcome(checked: dict[str, Any]) -> str:
    """One checked gate condition with its values: ``ppo.task_score >= champion - 0.02 (was 0.61; champion
    RUN had 0.7)``, or with the reason it could not be compared."""
    if checked["value"] is None or ("champion" in checked and "threshold" not in checked):
        return f"{checked['condition']} ({checked['reason']})"
    champion = checked.get("champion")
    theirs = f"; champion {champion['run_id']} had {champion['value']:.4g}" if champion else ""
    return f"{checked['condition']} (was {checked['value']:.4g}{theirs})"
