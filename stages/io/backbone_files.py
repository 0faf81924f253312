"""The backbone's files, read without loading it (torch-free): where they are, their fingerprint for cache
keys, whether the tokenizer has a chat template, the hub commit a branch resolved to.

Nothing here builds or downloads: a built-in backbone is built by ``stages.model.builtin_backbone`` (an
explicit pre-flight step of the CLI, or a stage's own start), so computing a cache key never trains a model.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from stages.io import artifacts
from stages.io.artifacts import ArtifactError
from stages.io.builtin_spec import builtin_dir
from stages.io.config import BackboneSection

BUILTIN_PREFIX = "builtin:"
# The default simple tokenizer, and the same weights with a chat model's tokenizer (stages.io.builtin_spec).
BUILTIN_NAMES = ("builtin:tiny", "builtin:tiny-chat")
_SAMPLE_BYTES = 1 << 20  # weight files are fingerprinted by size plus their first and last MiB


class BackboneError(ArtifactError):
    """A backbone that cannot be found, loaded, or is not frozen.

    An ``ArtifactError`` because the backbone is the input artifact of every stage: a missing one is the
    user's to fix, so the CLI and the stage runner print it as one line and exit with status 2.
    """


def backbone_location(cfg: BackboneSection) -> str:
    """Where the backbone's files are: a folder (the built-in backbone's build folder, built or not; a
    local folder), else the hub id. Raises ``BackboneError`` for an unknown built-in name, and for a name
    that is neither a folder nor a valid hub id (or one not cached while ``HF_HUB_OFFLINE=1``)."""
    if cfg.name.startswith(BUILTIN_PREFIX):
        if cfg.name not in BUILTIN_NAMES:
            raise BackboneError(
                f"backbone.name: unknown built-in backbone {cfg.name!r}; choose one of {list(BUILTIN_NAMES)}"
            )
        return str(builtin_dir(chat=is_builtin_chat(cfg)))
    if Path(cfg.name).exists():
        return str(Path(cfg.name).resolve())
    _check_hub_id(cfg)
    return cfg.name


def is_builtin_chat(cfg: BackboneSection) -> bool:
    return cfg.name == "builtin:tiny-chat"


def unbuilt_builtin(cfg: BackboneSection) -> bool:
    """Whether ``cfg`` names a built-in backbone that is not built yet (``python -m
    stages.model.builtin_backbone [--chat]`` builds it; the pre-flight of ``rlhf run`` does)."""
    return cfg.name in BUILTIN_NAMES and not artifacts.is_finished(Path(backbone_location(cfg)))


def built_location(cfg: BackboneSection) -> str:
    """``backbone_location``, refusing a built-in backbone that is not built yet (``BackboneError``): what
    reads the backbone's files never builds it."""
    if unbuilt_builtin(cfg):
        raise BackboneError(
            f"backbone.name={cfg.name}: the built-in backbone is not built yet; `rlhf build-backbone` "
            "builds it (rlhf run, stage, resume, plan and sweep do in their pre-flight)"
        )
    return backbone_location(cfg)


def backbone_files(cfg: BackboneSection) -> Path | None:
    """The folder of the backbone's files: a local folder, a built built-in backbone, or the snapshot of a
    hub id in the local HF cache; None for a hub id not downloaded yet. Never builds or downloads:
    raises ``BackboneError`` for a built-in backbone that is not built yet."""
    location = built_location(cfg)
    return Path(location) if Path(location).is_dir() else _local_snapshot(location, cfg.revision)


def has_chat_template(cfg: BackboneSection) -> bool | None:
    """Whether the backbone's tokenizer has a chat template, read from its files without loading it;
    None when its files are not here (a hub id not downloaded yet). Raises ``BackboneError`` as
    ``backbone_files`` does."""
    folder = backbone_files(cfg)
    if folder is None:
        return None
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    config = folder / "tokenizer_config.json"
    return bool(config.is_file() and json.loads(config.read_text()).get("chat_template"))


def _check_hub_id(cfg: BackboneSection) -> None:
    """Fail now, in one line, on a name that can only be a missing folder or an unreachable hub model;
    otherwise the first sign would be a hub client traceback inside a stage process."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(cfg.name)
    except HFValidationError:
        raise BackboneError(
            f"backbone.name={cfg.name!r}: no such folder, and not a hub id (NAME or ORG/NAME)"
        ) from None
    if _hub_offline() and _local_snapshot(cfg.name, cfg.revision) is None:
        revision = f" at revision {cfg.revision!r}" if cfg.revision else ""
        raise BackboneError(
            f"backbone.name={cfg.name!r}: not a local folder, and not in the local HF cache{revision} while "
            f"HF_HUB_OFFLINE=1; download it first (`hf download {cfg.name}`) or point backbone.name at a folder"
        )


def _hub_offline() -> bool:
    # Read at call time (huggingface_hub reads it once, at import), with the values huggingface_hub accepts.
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def backbone_fingerprint(cfg: BackboneSection, quantized: bool) -> str:
    """Digest of the base weights' identity plus how they are loaded (dtype, 4-bit): each file's path,
    size and first and last MiB. Raises ``BackboneError`` as ``backbone_files`` does."""
    folder = backbone_files(cfg)
    digest = hashlib.sha256(f"dtype={cfg.dtype};nf4={quantized}".encode())
    if folder is None:  # not downloaded yet: the hub id and revision are all we can know
        digest.update(f"hub:{backbone_location(cfg)}@{cfg.revision or 'main'}".encode())
        return digest.hexdigest()[:16]
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json"):
        digest.update(path.relative_to(folder).as_posix().encode() + str(path.stat().st_size).encode())
        with path.open("rb") as handle:
            digest.update(handle.read(_SAMPLE_BYTES))
            if path.stat().st_size > 2 * _SAMPLE_BYTES:
                handle.seek(-_SAMPLE_BYTES, 2)
                digest.update(handle.read(_SAMPLE_BYTES))
    return digest.hexdigest()[:16]


def hub_commit(cfg: BackboneSection) -> str | None:
    """The commit of the hub snapshot a hub-id backbone loads from (the local HF cache names each snapshot
    folder by its commit: ``models--ORG--NAME/snapshots/<commit>``), so a branch like ``main`` is pinned
    to what was really trained on; None for a local folder, a built-in backbone or a model not here."""
    location = backbone_location(cfg)
    if cfg.name in BUILTIN_NAMES or Path(location).is_dir():
        return None
    folder = _local_snapshot(location, cfg.revision)
    return folder.name if folder is not None and folder.parent.name == "snapshots" else None


def _local_snapshot(repo_id: str, revision: str | None) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:  # not in the local HF cache (or not a valid id): fingerprint by name
        return None
