"""What a stage's result depends on, and the cache key derived from it.

The same function serves the flow (to decide whether a stage can be skipped, without importing torch)
and the stage itself (to write its manifest), so the two can never disagree about a key.
"""

from __future__ import annotations

import ast
import hashlib
import json
from functools import lru_cache
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from stages.io import artifacts
from stages.io.config import PipelineConfig
from stages.io.data import DataKind, dataset_digest
from stages.io.deepspeed_config import launch_identity
from stages.model.adapters import needs_4bit
from stages.model.backbone import backbone_fingerprint
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


@lru_cache(maxsize=None)
def code_version(stage: str, package_dir: Path | None = None) -> str:
    """Digest of the code that computes ``stage``'s result: its recipe module and every module of the
    recipe's package it imports, transitively (``code_files``); its registry entry; and the pinned
    numeric libraries. Editing RRHF's recipe leaves SFT cached, editing a loss invalidates the stages
    that import it. The registry file itself is left out (adding a stage changes no other stage's key):
    the entry's fields stand in for it. ``package_dir``: see ``code_files``."""
    entry = spec(stage)
    digest = hashlib.sha256(json.dumps(entry.identity(), sort_keys=True).encode())
    root = package_dir or Path(_package_dir(entry.module.split(".")[0]))
    for path in code_files(entry.module, root):
        digest.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    for name in _VERSIONED:
        digest.update(f"{name}=={metadata.version(name)}".encode())
    return digest.hexdigest()[:16]


def code_files(module: str, package_dir: Path | None = None) -> list[Path]:
    """The file of ``module`` and of every module of its top-level package that it imports, directly or
    through others, read statically (``ast``: imports inside functions count; nothing is executed, so the
    flow never imports torch for this). ``package_dir`` overrides where that package lives (tests).

    Raises ``ModuleNotFoundError`` when ``module`` itself has no file.
    """
    top = module.split(".")[0]
    root = package_dir or Path(_package_dir(top))
    files: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in files or name == REGISTRY_MODULE:
            continue
        path = _module_file(root, name.split(".")[1:])
        if path is None:
            if name == module:
                raise ModuleNotFoundError(f"{module}: no such module under {root}")
            continue  # a name imported from a module (``from stages.io.config import ConfigError``)
        files[name] = path
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                todo += [alias.name for alias in node.names if alias.name.split(".")[0] == top]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == top:
                todo += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
    return sorted(files.values())


REGISTRY_MODULE = "stages.registry"


def _package_dir(top: str) -> str:
    found = find_spec(top)
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(f"{top}: not an importable package")
    return list(found.submodule_search_locations)[0]


def _module_file(root: Path, parts: list[str]) -> Path | None:
    """``root/a/b.py`` or ``root/a/b/__init__.py`` for module ``<top>.a.b``; the package itself for no parts."""
    base = root.joinpath(*parts)
    for candidate in (base.with_suffix(".py") if parts else None, base / "__init__.py"):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


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
        "code_version": code_version(stage),
    }
    provenance["cache_key"] = _sha(json.dumps(provenance, sort_keys=True))
    return provenance


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]
