"""Atomic artifacts: write into a temporary sibling folder, write ``manifest.json`` last, rename.

A folder without a manifest is never trusted: a killed stage leaves at most a ``.tmp-*`` folder,
which nothing reads and the next run of that stage removes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


class ArtifactError(RuntimeError):
    """A missing, unfinished or mismatched artifact."""


def is_finished(folder: Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{folder}: no {MANIFEST}, so this is not a finished artifact")
    return json.loads(path.read_text())


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically (temp file + rename), so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


@contextmanager
def staging(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``final``; remove it if the block fails."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):  # left by a killed earlier attempt
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: Path, final: Path, manifest: dict[str, Any]) -> Path:
    """Record the content digest, write the manifest last, then move ``tmp`` to ``final`` in one rename."""
    tmp, final = Path(tmp), Path(final)
    manifest = {**manifest, "artifact_digest": tree_digest(tmp)}
    write_json(tmp / MANIFEST, manifest)
    if final.exists():  # an unfinished or superseded folder: move it aside, then drop it
        trash = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(tmp, final)
    return final


def tree_digest(folder: Path) -> str:
    """sha256 over relative paths and contents of every file except the manifest."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def artifact_digest(folder: Path) -> str:
    """The digest a finished artifact was published with (what downstream cache keys use)."""
    return read_manifest(folder)["artifact_digest"]


def copy_artifact(src: Path, dst: Path) -> Path:
    """Publish a copy of a finished artifact at ``dst``, atomically, by hard links where possible.

    Hard links are safe because a published artifact is never modified, only replaced.
    """
    read_manifest(src)  # refuse to copy an unfinished folder
    dst = Path(dst)
    with staging(dst) as tmp:
        shutil.copytree(src, tmp, copy_function=_link_or_copy, dirs_exist_ok=True)
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    return dst


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
