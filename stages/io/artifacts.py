"""Atomic artifacts: write into a temporary sibling folder, write ``manifest.json`` last, rename.

A folder without a manifest is never trusted: a killed stage leaves at most a ``.tmp-*`` folder,
which nothing reads and the next run of that stage removes. A disk that refuses a write (full, over a
quota or a file-size limit) fails the stage with one ``ArtifactError`` line and leaves nothing behind.
The manifest records the sha256 of every file, so ``verify`` names a file that changed after publishing
(a truncated or garbled adapter) before anything tries to load it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
# errno values meaning "storage refused the write": the user's to fix (free space, raise a limit), not a bug.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EIO})


class ArtifactError(RuntimeError):
    """A missing, unfinished or mismatched artifact."""


def is_finished(folder: Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{folder}: no {MANIFEST}, so this is not a finished artifact")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{path}: corrupted manifest ({err}); rerun the stage that produced {folder}") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: corrupted manifest (not a JSON object); rerun the stage that produced {folder}")
    return manifest


def verify(folder: Path, under: str | None = None) -> dict[str, Any]:
    """The manifest of a finished artifact whose files are byte for byte the ones it was published with.

    Raises ``ArtifactError`` naming the first file that is missing, changed (truncated, garbled) or new.
    ``under`` limits the check to one subfolder: the files a loader is about to read. Manifests written
    before per-file digests existed are checked whole, against their tree digest.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    recorded = manifest.get("files")
    if recorded is None:
        if tree_digest(folder) != manifest.get("artifact_digest"):
            raise ArtifactError(
                f"{folder}: its files changed after it was published (the digest in {MANIFEST} "
                "no longer matches); rerun the stage that produced it"
            )
        return manifest
    actual = file_digests(folder)
    if under is not None:
        recorded = {name: d for name, d in recorded.items() if name.startswith(f"{under}/")}
        actual = {name: d for name, d in actual.items() if name.startswith(f"{under}/")}
    problems = [(name, "is missing") for name in sorted(set(recorded) - set(actual))]
    problems += [
        (name, "is corrupted or changed since it was published (sha256 differs from the manifest)")
        for name in sorted(set(recorded) & set(actual))
        if recorded[name] != actual[name]
    ]
    problems += [(name, "was added after publishing") for name in sorted(set(actual) - set(recorded))]
    if problems:
        name, what = problems[0]
        more = f" ({len(problems) - 1} more file(s) differ)" if len(problems) > 1 else ""
        raise ArtifactError(f"{folder / name}: {what}{more}; rerun the stage that produced {folder}")
    return manifest


def strict_json(payload: Any) -> Any:
    """``payload`` with every NaN or infinite float replaced by None: strict JSON (``NaN`` is no JSON
    value, and strict parsers such as ``jq`` or JavaScript's reject the file)."""
    if isinstance(payload, float):
        return payload if math.isfinite(payload) else None
    if isinstance(payload, dict):
        return {key: strict_json(value) for key, value in payload.items()}
    if isinstance(payload, (list, tuple)):
        return [strict_json(value) for value in payload]
    return payload


def write_json(path: Path, payload: Any) -> None:
    """Write strict JSON (``strict_json``) atomically (temp file + rename), so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(json.dumps(strict_json(payload), indent=2, sort_keys=True, allow_nan=False) + "\n")
        os.replace(tmp, path)
    except BaseException as err:  # a full disk must not leave a stray half-written temp file behind
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.filename is None:  # a failed write() names no file: name it
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise


@contextmanager
def staging(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``final``; remove it if the block fails.

    A write that storage refuses (disk full, quota, file-size limit) becomes one ``ArtifactError`` naming
    the file, as it will be called once published: it is the user's to fix, not a bug to trace.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):  # left by a killed earlier attempt
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except OSError as err:
        if err.errno not in STORAGE_ERRNOS:
            raise
        # Name the file as it would have been called once published, not by its staging-folder path.
        target = str(err.filename).replace(str(tmp), str(final)) if err.filename else f"into {final}"
        raise ArtifactError(
            f"{final}: not published: writing {target} failed ({err.strerror}); nothing was kept, "
            "free space (or raise the file-size limit) and rerun"
        ) from err
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def storage_error(err: Exception, path: Path) -> Exception:
    """safetensors (Rust) reports a refused write as ``SafetensorError('... (os error 27)')``: give it back
    its errno as an ``OSError`` naming ``path``, so ``staging`` can tell a full disk from a bug. Any other
    error is returned as it is."""
    match = re.search(r"\(os error (\d+)\)", str(err))
    if match is None:
        return err
    code = int(match.group(1))
    return OSError(code, os.strerror(code), str(path))


def publish(tmp: Path, final: Path, manifest: dict[str, Any]) -> Path:
    """Record the content digests, write the manifest last, then move ``tmp`` to ``final`` in one rename."""
    tmp, final = Path(tmp), Path(final)
    manifest = {**manifest, "artifact_digest": tree_digest(tmp), "files": file_digests(tmp)}
    write_json(tmp / MANIFEST, manifest)
    if final.exists():  # an unfinished or superseded folder: move it aside, then drop it
        trash = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(tmp, final)
    return final


def _artifact_files(folder: Path) -> list[Path]:
    # Every manifest is left out, nested ones too (PPO keeps its last checkpoint, with its manifest).
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != MANIFEST)


def file_digests(folder: Path) -> dict[str, str]:
    """sha256 of each file (relative POSIX path -> hex), every manifest excluded."""
    folder = Path(folder)
    return {
        path.relative_to(folder).as_posix(): _feed(hashlib.sha256(), path).hexdigest()
        for path in _artifact_files(folder)
    }


def tree_digest(folder: Path) -> str:
    """sha256 over relative paths and contents of every file except the manifest."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in _artifact_files(folder):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        _feed(digest, path)
    return digest.hexdigest()


def _feed(digest: hashlib._Hash, path: Path) -> hashlib._Hash:
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest


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
