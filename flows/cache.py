"""Content-addressed cache of finished stage artifacts: ``$RLHF_HOME/cache/<cache_key>/``.

A stage's cache key (``stages.provenance``) digests everything its result depends on, so a hit is
reused as is: the cached folder is hard-linked into the new run's stage folder. Entries are written
and restored atomically and an entry without a manifest is never trusted.
"""

from __future__ import annotations

from pathlib import Path

from stages import artifacts, paths


class ArtifactCache:
    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else paths.rlhf_home() / "cache"

    def lookup(self, key: str) -> Path | None:
        """The cached artifact for ``key``, or None when there is no finished entry."""
        entry = self.root / key
        if not artifacts.is_finished(entry):
            return None
        if artifacts.read_manifest(entry).get("cache_key") != key:  # corrupt or hand-edited: ignore it
            return None
        return entry

    def store(self, key: str, artifact: Path) -> Path:
        """Remember a freshly published artifact under its key (first writer wins).

        Two runs finishing the same stage at once serialise on a lock file; readers never see a partial
        entry because the entry appears by rename, manifest included.
        """
        from filelock import FileLock

        entry = self.root / key
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(entry) + ".lock"):
            if self.lookup(key) is None:
                artifacts.copy_artifact(artifact, entry)
        return entry

    def restore(self, key: str, dest: Path) -> Path:
        entry = self.lookup(key)
        if entry is None:
            raise artifacts.ArtifactError(f"cache has no finished entry for {key}")
        return artifacts.copy_artifact(entry, dest)
