"""What a stage's result depends on, and the cache key derived from it.

The same function serves the flow (to decide whether a stage can be skipped, without importing torch)
and the stage itself (to write its manifest), so the two can never disagree about a key.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

from stages import artifacts
from stages.adapters import needs_4bit
from stages.backbone import backbone_fingerprint
from stages.config import PipelineConfig
from stages.data import DataKind, dataset_digest

# Libraries whose version changes numerics enough to invalidate cached results.
_VERSIONED = ("torch", "transformers", "peft", "trl", "bitsandbytes", "deepspeed")


@dataclass(frozen=True)
class StageSpec:
    sections: tuple[str, ...]  # config sections the stage's result depends on
    inputs: tuple[str, ...]  # upstream stages whose artifacts it reads
    datasets: tuple[DataKind, ...]  # datasets it trains or evaluates on


STAGES: dict[str, StageSpec] = {
    "sft": StageSpec(("backbone", "adapter", "task", "data", "sft", "eval"), (), ("sft", "eval")),
}


def check_datasets(cfg: PipelineConfig) -> None:
    """Load and validate every dataset the configured stages read; raises ``DataError`` on the first bad row."""
    kinds = {kind for stage in cfg.run.stages for kind in STAGES[stage].datasets}
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
    spec = STAGES[stage]
    missing = [name for name in spec.inputs if name not in inputs]
    if missing:
        raise artifacts.ArtifactError(f"stage {stage} needs the artifacts of {missing}")
    datasets = {kind: dataset_digest(getattr(cfg.data, kind), kind, cfg.task) for kind in spec.datasets}
    provenance: dict[str, Any] = {
        "stage": stage,
        "config_digest": _sha(cfg.digest(*spec.sections) + f"seed={cfg.run.seed}"),
        "backbone_fingerprint": backbone_fingerprint(cfg.backbone, needs_4bit(cfg.adapter.kind)),
        "input_digests": {name: artifacts.artifact_digest(inputs[name]) for name in spec.inputs},
        "dataset_digest": _sha(json.dumps(datasets, sort_keys=True)),
        "code_version": code_version(),
    }
    provenance["cache_key"] = _sha(json.dumps(provenance, sort_keys=True))
    return provenance


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]
