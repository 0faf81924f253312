"""The runs folder's layout, and the one place that reads and writes its files::

    <runs-dir>/
      <run-id>/
        config.yaml       the resolved config (config.<n>.yaml: the ones `rlhf stage --set` replaced)
        status.json       what the flow did with each stage: running, completed, cached, failed, crashed
        flow_runs.json    the Prefect flow run of each invocation, and which ones crashed (``flows.liveness``)
        <stage>/          the stage's artifact: manifest.json (with its metrics), history.json, ...
        promotion.json    the run's promotion decision (decided in ``flows.promotion``)
        sweep.json        the sweep and trial a run started by ``rlhf sweep`` belongs to
        .running.lock     held by the process that runs the run's pipeline
      sweeps/<name>/      a sweep's definition, leaderboard and report
      promoted.json       the latest promoted run (``flows.promotion.LATEST``, derived from every run)

Every other flows module imports this one and none of them each other for these files, so the flows
modules form no import circle (``tests/test_layout.py``).
"""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages.io import artifacts
from stages.io.config import ConfigError, PipelineConfig, load_config
from stages.registry import STAGE_ORDER

if TYPE_CHECKING:
    from filelock import BaseFileLock

CONFIG = "config.yaml"
STATUS = "status.json"
HISTORY = "history.json"  # in a stage's folder: the training log its curves are drawn from
PROMOTION = "promotion.json"
PROMOTED, NOT_PROMOTED = "promoted", "not promoted"  # a promotion record's status
TRIAL_FILE = "sweep.json"  # which sweep and trial the run belongs to
RUN_LOCK = ".running.lock"
SWEEPS = "sweeps"
FINISHED = ("completed", "cached")  # the statuses of a stage whose artifact is the run's
RUNNING, CRASHED = "running", "crashed"  # crashed: it was running when the process running it died
FLOW_RUNS = "flow_runs.json"


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def prepare_run_dir(runs_dir: Path, run_id: str, cfg: PipelineConfig) -> Path:
    """Create the run folder and write its resolved config; an existing run must have the same config."""
    run_dir = Path(runs_dir) / run_id
    config_text = cfg.to_yaml()
    existing = run_dir / CONFIG
    if existing.is_file() and existing.read_text() != config_text:
        raise ConfigError(f"{existing}: run {run_id!r} already exists with a different config; choose another --run-id")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not existing.is_file():
        tmp = existing.with_name(f".{CONFIG}.tmp")
        tmp.write_text(config_text)
        tmp.replace(existing)
    return run_dir


def update_run_config(run_dir: Path, cfg: PipelineConfig) -> None:
    """Replace a run's config (for ``rlhf stage --set``), keeping every previous one as config.<n>.yaml."""
    current = Path(run_dir) / CONFIG
    text = cfg.to_yaml()
    if current.read_text() == text:
        return
    n = len(list(Path(run_dir).glob("config.*.yaml"))) + 1
    current.replace(Path(run_dir) / f"config.{n}.yaml")
    tmp = current.with_name(f".{CONFIG}.tmp")
    tmp.write_text(text)
    tmp.replace(current)


def read_config(run_dir: Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """The run's resolved config, with ``--set`` ``overrides`` on top (``ConfigError`` for a folder that
    is no run, or a bad override)."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no such run (see `rlhf runs`)")
    return load_config(path, overrides)


def run_started(run_dir: Path) -> str:
    """When the run was created, UTC, ``YYYY-MM-DD HH:MM:SS``: when its first config was written (``rlhf stage
    --set`` keeps a replaced config as ``config.<n>.yaml``, renamed with its time, and writes a new one)."""
    first = min(path.stat().st_mtime for path in Path(run_dir).glob("config*.yaml"))
    return datetime.fromtimestamp(first, UTC).strftime("%Y-%m-%d %H:%M:%S")


def read_status(run_dir: Path) -> dict[str, dict[str, Any]]:
    path = Path(run_dir) / STATUS
    return json.loads(path.read_text()) if path.is_file() else {}


def record_status(run_dir: Path, stage: str, **fields: Any) -> None:
    """Set one stage's entry in ``status.json`` (atomic rewrite; the flow runs stages one at a time)."""
    status = read_status(run_dir)
    status[stage] = {**fields, "updated_at": datetime.now(UTC).isoformat(timespec="seconds")}
    artifacts.write_json(Path(run_dir) / STATUS, status)


def read_flow_runs(run_dir: Path) -> list[dict[str, Any]]:
    """Each invocation's Prefect flow run, oldest first: ``{"id", "name", "started_at", "pid", "host"}``, with
    ``crashed_at`` once its process was found dead, ``in_prefect`` once Prefect shows it crashed too, and
    ``resumed_by`` (the id of the flow run that went on with the run)."""
    path = Path(run_dir) / FLOW_RUNS
    return json.loads(path.read_text()) if path.is_file() else []


def write_flow_runs(run_dir: Path, flow_runs: list[dict[str, Any]]) -> None:
    artifacts.write_json(Path(run_dir) / FLOW_RUNS, flow_runs)


def run_finished(run_dir: Path) -> bool:
    """Whether every stage of the run is finished (completed or cached): only then does its decision count."""
    status = read_status(run_dir)
    return bool(status) and all(entry["status"] in FINISHED for entry in status.values())


def read_stages(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Each stage the run began, in pipeline order: ``{"status", "seconds", "metrics", "artifact"[, "error"]}``;
    the metrics and artifact of a finished stage only."""
    stages: dict[str, dict[str, Any]] = {}
    status = read_status(run_dir)
    for stage in sorted(status, key=STAGE_ORDER.index):  # status.json is sorted by name
        entry = status[stage]
        folder = Path(run_dir) / stage
        finished = artifacts.is_finished(folder) and entry["status"] in FINISHED
        stages[stage] = {
            "status": entry["status"],
            "seconds": entry.get("seconds"),
            "metrics": artifacts.read_manifest(folder)["metrics"] if finished else {},
            "artifact": str(folder) if finished else None,
        }
        if "error" in entry:
            stages[stage]["error"] = entry["error"]
    return stages


def read_history(run_dir: Path, stage: str) -> list[dict[str, Any]]:
    """A stage's training log (one dict per logged step), empty before it wrote one."""
    path = Path(run_dir) / stage / HISTORY
    return json.loads(path.read_text()) if path.is_file() else []


def read_promotion(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / PROMOTION
    return json.loads(path.read_text()) if path.is_file() else None


def write_promotion(run_dir: Path, record: dict[str, Any] | None) -> None:
    """Write the run's decision (None: remove it)."""
    if record is None:
        (Path(run_dir) / PROMOTION).unlink(missing_ok=True)
    else:
        artifacts.write_json(Path(run_dir) / PROMOTION, record)


def read_trial(run_dir: Path) -> dict[str, Any]:
    """``{"sweep", "trial", "params"}`` of a run started by ``rlhf sweep``; empty for other runs."""
    path = Path(run_dir) / TRIAL_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_trial(run_dir: Path, sweep: str, trial: int, params: dict[str, Any]) -> None:
    artifacts.write_json(Path(run_dir) / TRIAL_FILE, {"sweep": sweep, "trial": trial, "params": params})


def sweep_dir(runs_dir: Path, sweep: str) -> Path:
    """``<runs-dir>/sweeps/<name>/``: the sweep's definition, leaderboard and report."""
    return Path(runs_dir) / SWEEPS / sweep


def run_lock(run_dir: Path) -> BaseFileLock:
    """The lock the process running the run's pipeline holds; the OS releases it if that process dies."""
    from filelock import FileLock

    return FileLock(str(Path(run_dir) / RUN_LOCK))


def is_running(run_dir: Path) -> bool:
    """Whether another live process holds the run's lock."""
    from filelock import Timeout

    try:
        run_lock(run_dir).acquire(timeout=0).lock.release()
    except Timeout:
        return True
    return False
