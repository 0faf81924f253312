"""Promotion: whether a finished run is good enough to ship, decided by its gate or by a person.

A run's ``gate.conditions`` (``"ppo.task_score >= 0.8"``: a stage, one of its final metrics, a comparison,
a number or the champion's value, ``stages.io.gate``) are checked when the pipeline finishes. The champion
of a stage is the latest promoted run, other than the one decided, that finished that stage
(``find_champion``); a condition on a champion that does not exist yet is not checked, and the gate decides
by the rest (so the first run of a nightly schedule whose gate names only the champion is promoted, and
becomes the champion). A run that fails its gate still finishes and keeps its
artifacts; it is marked ``not promoted`` with the conditions that failed. ``rlhf promote RUN_ID`` records
a human approval (who, when, why), also over a failed gate. A run without a gate is never promoted
automatically, so a scheduled run ships only through its gate.

Each run keeps its decision in ``<run>/promotion.json``. ``<runs-dir>/promoted.json`` always names the
latest promoted run: it is derived from every run's decision each time one changes, so a run whose rerun
fails its gate stops being the one named there.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flows.run_dir import (
    NOT_PROMOTED,
    PROMOTED,
    PROMOTION,
    read_config,
    read_promotion,
    read_stages,
    run_finished,
    write_promotion,
)
from stages.io import artifacts
from stages.io.config import ConfigError
from stages.io.gate import Champion, Condition

LATEST = "promoted.json"  # in the runs folder: the latest promoted run


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")  # orders two promotions in one second


def apply_gate(run_dir: Path, conditions: list[str]) -> dict[str, Any] | None:
    """Decide a finished run's promotion by its gate and record it; return the run's decision.

    A person's approval stands while the run's artifacts are the ones approved (the same content digest
    for every stage), with the gate's new verdict beside it; once a stage holds other files (retrained,
    also by ``--force`` under the same cache key, or another configuration's from the cache) the approval
    is void and the gate decides, or, without a gate, the run is no longer promoted.
    """
    gate = None
    if conditions:
        metrics = {stage: entry["metrics"] for stage, entry in read_stages(run_dir).items()}
        parsed = [Condition.parse(text) for text in conditions]
        champions = {
            c.champion.stage: find_champion(Path(run_dir).parent, c.champion.stage, exclude=Path(run_dir).name)
            for c in parsed
            if c.champion is not None
        }
        checked = [c.check(metrics, champions[c.champion.stage] if c.champion else None) for c in parsed]
        failed = [c for c in checked if c["passed"] is False]  # None: a champion condition with no champion
        gate = {
            "status": NOT_PROMOTED if failed else PROMOTED,
            "by": "gate",
            "at": _now(),
            "conditions": checked,
            "failed": [c["condition"] for c in failed],
            **({"champions": {stage: c.run_id if c else None for stage, c in champions.items()}} if champions else {}),
            "artifact_digests": artifact_digests(run_dir),
        }
    previous = read_promotion(run_dir)
    if gate and previous and previous["by"] == "gate" and _same_verdict(previous, gate):
        # A rerun that changed neither the files nor the verdict (`rlhf resume`, a cached rerun) keeps the time of
        # the decision: re-stamping it would make an old promoted run the latest, hence the champion.
        gate["at"] = previous["at"]
    if previous and previous["by"] == "manual" and previous.get("artifact_digests") == artifact_digests(run_dir):
        record: dict[str, Any] | None = {**previous, "gate": gate or previous.get("gate")}
    else:
        record = gate
    _record(run_dir, record)
    return record


def _same_verdict(previous: dict[str, Any], gate: dict[str, Any]) -> bool:
    return previous["status"] == gate["status"] and previous.get("artifact_digests") == gate["artifact_digests"]


def find_champion(runs_dir: Path, stage: str, exclude: str) -> Champion | None:
    """The champion of ``stage``: the latest promoted run (by promotion time, ``promoted_runs``) other than
    ``exclude`` that finished ``stage``, with every finished stage's final metrics; None if there is none."""
    for row in reversed(promoted_runs(runs_dir)):
        if row["run_id"] == exclude:
            continue
        stages = read_stages(Path(runs_dir) / row["run_id"])
        if (stages.get(stage) or {}).get("artifact"):
            return Champion(row["run_id"], {name: entry["metrics"] for name, entry in stages.items()})
    return None


def artifact_digests(run_dir: Path) -> dict[str, str]:
    """The content digest of each finished stage artifact of the run: which files a decision was about.
    Not the cache key: ``--force`` retrains under the same key, and on a GPU or over DeepSpeed ranks the
    new weights differ."""
    return {m.parent.name: artifacts.artifact_digest(m.parent) for m in sorted(Path(run_dir).glob("*/manifest.json"))}


def promote(run_dir: Path, approved_by: str, reason: str | None = None) -> dict[str, Any]:
    """A human approval of a finished run, kept with its gate's verdict (``ConfigError`` for a run that
    did not finish every stage)."""
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    stages = read_stages(run_dir)
    unfinished = [s for s in cfg.run.stages if not (stages.get(s) or {}).get("artifact")]
    if unfinished:
        raise ConfigError(
            f"run {run_dir.name}: {', '.join(unfinished)} did not finish; only a finished run can be "
            f"promoted (`rlhf resume {run_dir.name}` finishes it)"
        )
    previous = read_promotion(run_dir) or {}
    gate = previous if previous.get("by") == "gate" else previous.get("gate")  # a second approval keeps it too
    record = {
        "status": PROMOTED,
        "by": "manual",
        "approved_by": approved_by,
        "at": _now(),
        "reason": reason,
        "gate": gate,
        "artifact_digests": artifact_digests(run_dir),
    }
    _record(run_dir, record)
    return record


def _record(run_dir: Path, record: dict[str, Any] | None) -> None:
    """Write (None: remove) the run's decision, then name the latest promoted run in ``promoted.json``."""
    with _latest_lock(Path(run_dir).parent):
        write_promotion(run_dir, record)
        _write_latest(Path(run_dir).parent)


def refresh_latest(runs_dir: Path) -> None:
    """Name the latest promoted run in ``promoted.json`` again: after a rerun of a promoted run failed,
    it no longer counts (``promoted_runs``) until it finishes."""
    with _latest_lock(Path(runs_dir)):
        _write_latest(Path(runs_dir))


def _latest_lock(runs_dir: Path) -> Any:
    from filelock import FileLock

    return FileLock(str(runs_dir / f".{LATEST}.lock"))  # two runs finishing at once: one rewrite at a time


def _write_latest(runs_dir: Path) -> None:
    latest = max(promoted_runs(runs_dir), key=lambda row: row["at"], default=None)
    if latest is None:
        (runs_dir / LATEST).unlink(missing_ok=True)
    else:
        artifacts.write_json(runs_dir / LATEST, latest)


def promoted_runs(runs_dir: Path) -> list[dict[str, Any]]:
    """Every promoted run in ``runs_dir`` whose stages are all finished (a failed rerun of a promoted run
    does not count until it finishes again), oldest promotion first: ``{run_id, at, by[, approved_by]}``."""
    rows = []
    for path in Path(runs_dir).glob(f"*/{PROMOTION}"):
        record = read_promotion(path.parent)
        if record and record["status"] == PROMOTED and run_finished(path.parent):
            rows.append(
                {
                    "run_id": path.parent.name,
                    "at": record["at"],
                    "by": record["by"],
                    **({"approved_by": record["approved_by"]} if record["by"] == "manual" else {}),
                }
            )
    return sorted(rows, key=lambda row: row["at"])
