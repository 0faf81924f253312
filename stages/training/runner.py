"""What every stage shares around its recipe: train into a staging folder, add the provenance, publish.

A stage process starts in ``stages.training.entry`` (``python -m stages.training.entry sft --out ...``),
which sets the process up and calls ``stage_main`` here.

A stage function receives the validated config and a ``StageContext`` (an empty staging folder, the
final location, its input artifacts, its cache key), writes its files into the staging folder and
returns its metrics. The runner adds the provenance and publishes atomically, so an
exception (or a kill) leaves no folder that a later run could mistake for a finished one.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from stages.io import artifacts
from stages.io.config import ConfigError, PipelineConfig
from stages.io.data import DataError
from stages.io.devices import available_cores, stage_threads
from stages.io.provenance import stage_datasets, stage_provenance
from stages.model.backbone import resolve_backbone
from stages.model.placement import host_facts
from stages.model.tokenization import TokenizationError
from stages.registry import spec
from stages.training.checkpoints import checkpoint_root
from stages.training.distributed import LOCAL, Distributed, setup_distributed
from stages.training.tracking import NoTracker, start_tracking
from stages.training.updater import NonFiniteLoss


@dataclass(frozen=True)
class StageContext:
    """Where a stage writes and what it reads."""

    staging: Path  # empty folder to write the artifact into; published at ``final`` on success
    final: Path  # where the artifact will appear (resumable state may live beside it)
    inputs: dict[str, Path]  # upstream artifacts by stage name
    cache_key: str  # this run's key: checkpoints are only resumed by a run with the same key
    dist: Distributed = LOCAL  # this process's rank when launched by accelerate; only the main rank publishes


StageFn = Callable[[PipelineConfig, StageContext], dict[str, Any]]
# Errors that are the user's to fix: print one line, no traceback.
USER_ERRORS = (ConfigError, DataError, artifacts.ArtifactError, NonFiniteLoss, TokenizationError)


def execute(stage: str, fn: StageFn, cfg: PipelineConfig, out: Path, inputs: dict[str, Path]) -> dict[str, Any] | None:
    """Run ``fn`` into a staging folder and publish it at ``out`` with its manifest; return the manifest
    (None on the ranks that do not publish).

    Under ``launcher: accelerate`` every rank trains; only the main rank tracks, writes and publishes
    (the other ranks write into scratch folders that are thrown away). Every rank leaves the job
    together once the artifact is published (``Distributed.close``).
    """
    dist = setup_distributed(cfg, stage)
    manifest = _train_and_publish(stage, fn, cfg, out, inputs, dist)
    dist.close()
    return manifest


def _train_and_publish(
    stage: str, fn: StageFn, cfg: PipelineConfig, out: Path, inputs: dict[str, Path], dist: Distributed
) -> dict[str, Any] | None:
    threads = stage_threads(cfg.run.threads) if dist is LOCAL else cfg.distributed.threads_per_process
    torch.set_num_threads(threads)
    if cfg.run.threads == "auto" and dist is LOCAL:
        print(
            f"{stage}: {threads} torch thread(s) of {available_cores()} core(s) (run.threads=auto: "
            "the cores other processes leave free)",
            file=sys.stderr,
        )
    torch.manual_seed(cfg.run.seed)
    resolve_backbone(cfg.backbone)  # a built-in backbone is built first, explicitly: its files enter the key
    provenance = stage_provenance(stage, cfg, inputs)
    datasets = {kind: getattr(cfg.data, kind) for kind in stage_datasets(stage, cfg)}
    tracker = start_tracking(cfg, stage, Path(out).resolve().parent, datasets) if dist.is_main else NoTracker()
    started = time.time()
    with artifacts.staging(out) if dist.is_main else tempfile.TemporaryDirectory() as tmp:
        context = StageContext(Path(tmp), Path(out), inputs, provenance["cache_key"], dist)
        metrics = {"adapter_kind": cfg.adapter.kind, **fn(cfg, context)}  # every stage reports its adapter kind
        if not dist.is_main:
            return None
        manifest = {
            **provenance,
            "metrics": metrics,
            "engine": {"name": dist.engine, "world_size": dist.world_size},
            "host": host_facts(threads),
            "seconds": round(time.time() - started, 2),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        artifacts.write_json(Path(tmp) / "metrics.json", metrics)
        if not spec(stage).hf_trainer:
            history = Path(tmp) / "history.json"
            rows = json.loads(history.read_text()) if history.is_file() else []
            tracker.log_history(rows, step_key=spec(stage).step_key)
        artifacts.publish(tmp, out, manifest)
    shutil.rmtree(checkpoint_root(out), ignore_errors=True)  # the artifact supersedes its checkpoints
    tracker.finish(metrics, Path(out), inputs)
    return manifest


def stage_main(stage: str, fn: StageFn, cfg: PipelineConfig, out: Path, inputs: dict[str, Path]) -> None:
    """A stage process's run (``stages.training.entry``): ``execute``, its user errors as one line on stderr
    and exit status 2, its result and warnings on stdout."""
    try:
        manifest = execute(stage, fn, cfg, out, inputs)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if manifest is not None:
        print(f"{stage}: published {out} in {manifest['seconds']:.1f}s; metrics {manifest['metrics']}")
        for warning in manifest["metrics"].get("warnings", []):
            print(f"warning: {warning}", flush=True)
