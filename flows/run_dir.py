"""A run's folder: ``<runs-dir>/<run-id>/`` with the resolved ``config.yaml``, ``status.json`` and one
folder per stage. ``status.json`` records what the flow did with each stage (completed, cached, failed)."""

from __future__ import annotations

import json
import secrets
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from stages.io import artifacts
from stages.io.config import ConfigError, PipelineConfig

CONFIG = "config.yaml"
STATUS = "status.json"


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def prepare_run_dir(runs_dir: Path, run_id: str, cfg: PipelineConfig) -> Path:
    """Create the run folder and write its resolved config; an existing run must have the same config."""
    run_dir = Path(runs_dir) / run_id
    config_text = cfg.to_yaml()
    existing = run_dir / CONFIG
    if existing.is_file() and existing.read_text() != config_text:
        raise ConfigError(
            f"{existing}: run {run_id!r} already exists with a different config; choose another --run-id"
        )
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


def read_status(run_dir: Path) -> dict[str, dict[str, Any]]:
    path = Path(run_dir) / STATUS
    return json.loads(path.read_text()) if path.is_file() else {}


def record_status(run_dir: Path, stage: str, **fields: Any) -> None:
    """Set one stage's entry in ``status.json`` (atomic rewrite; the flow runs stages one at a time)."""
    status = read_status(run_dir)
    status[stage] = {**fields, "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    artifacts.write_json(Path(run_dir) / STATUS, status)
