"""Content-addressed cache of finished stage artifacts: ``$RLHF_HOME/cache/<cache_key>/``.

A stage's cache key (``stages.io.provenance``) digests everything its result depends on, so a hit is
reused as is: the cached folder is hard-linked into the new run's stage folder. Entries are written
and restored atomically; an entry without a manifest, or with a file that no longer matches its
manifest digest, is never trusted.
"""

from __future__ import annotations

from pathlib import Path

from stages.io import artifacts, paths


class ArtifactCache:
    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else paths.rlhf_home() / "cache"

    def lookup(self, key: str) -> Path | None:
        """The cached artifact for ``key``, or None when there is no finished entry."""
        entry = self.root / key
        if not artifacts.is_finished(entry):
            return None
        try:
            # Every file is checked against its manifest digest: a garbled entry is a miss, so the stage runs
            # again and ``store`` replaces the entry, instead of restoring a broken adapter into every run.
            manifest = artifacts.verify(entry)
        except artifacts.ArtifactError as err:
            print(f"warning: ignoring cache entry {entry}: {err}", flush=True)
            return None
        if manifest.get("cache_key") != key:  # hand-edited or misplaced: ignore it
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
