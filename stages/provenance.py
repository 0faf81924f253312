"""What a stage's result depends on, and the cache key derived from it.

The same function serves the flow (to decide whether a stage can be skipped, without importing torch)
and the stage itself (to write its manifest), so the two can never disagree about a key.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

from stages import artifacts
from stages.adapters import needs_4bit
from stages.backbone import backbone_fingerprint
from stages.config import PipelineConfig
from stages.data import DataKind, dataset_digest
from stages.launch import launch_identity
from stages.registry import spec

# Libraries whose version changes numerics enough to invalidate cached results.
_VERSIONED = ("torch", "transformers", "peft", "trl", "bitsandbytes", "deepspeed")


def stage_inputs(stage: str, cfg: PipelineConfig) -> tuple[str, ...]:
    """Upstream artifacts a stage reads (the registry's; e.g. RRHF on offline ranked data needs no reward)."""
    return spec(stage).needed_inputs(cfg)


def stage_datasets(stage: str, cfg: PipelineConfig) -> tuple[DataKind, ...]:
    """``data.*`` kinds a stage reads (the registry's)."""
    return spec(stage).needed_datasets(cfg)  # type: ignore[return-value]


def check_datasets(cfg: PipelineConfig) -> None:
    """Load and validate every dataset the configured stages read; raises ``DataError`` on the first bad row."""
    kinds = {kind for stage in cfg.run.stages for kind in stage_datasets(stage, cfg)}
    for kind in sorted(kinds):
        dataset_digest(getattr(cfg.data, kind), kind, cfg.task)


@lru_cache(maxsize=1)
def code_version() -> str:
    """Digest of the stage code (every module under ``stages/``) and the pinned numeric libraries."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    for name in _VERSIONED:
        digest.update(f"{name}=={metadata.version(name)}".encode())
    return digest.hexdigest()[:16]


def stage_provenance(stage: str, cfg: PipelineConfig, inputs: dict[str, Path]) -> dict[str, Any]:
    """Config digest, backbone fingerprint, input and dataset digests, code version, and the cache key."""
    needed = stage_inputs(stage, cfg)
    missing = [name for name in needed if name not in inputs]
    if missing:
        raise artifacts.ArtifactError(f"stage {stage} needs the artifacts of {missing} (--input NAME=FOLDER)")
    datasets = {kind: dataset_digest(getattr(cfg.data, kind), kind, cfg.task) for kind in stage_datasets(stage, cfg)}
    provenance: dict[str, Any] = {
        "stage": stage,
        "config_digest": _sha(cfg.digest(*spec(stage).sections) + f"seed={cfg.run.seed}"),
        "launch": launch_identity(stage, cfg),
        "backbone_fingerprint": backbone_fingerprint(cfg.backbone, needs_4bit(cfg.adapter.kind)),
        "input_digests": {name: artifacts.artifact_digest(inputs[name]) for name in needed},
        "dataset_digest": _sha(json.dumps(datasets, sort_keys=True)),
        "code_version": code_version(),
    }
    provenance["cache_key"] = _sha(json.dumps(provenance, sort_keys=True))
    return provenance


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]
