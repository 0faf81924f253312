"""One stage of a run: reuse the cached artifact when the key matches, else launch the stage module.

Stages run as ``python -m stages.<name>`` in a child process (the same command a user can run by hand),
so the flow process never imports torch and a crashed stage cannot corrupt the flow's state. The child's
output is streamed to the terminal (progress bars included) and kept in ``<run>/logs/<stage>.log``.
"""

from __future__ import annotations

import codecs
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from flows.cache import ArtifactCache
from flows.run_dir import CONFIG, record_status
from stages import artifacts
from stages.config import load_config
from stages.provenance import stage_provenance


class StageFailed(RuntimeError):
    """A stage process exited non-zero; the message carries its last lines and the log's path."""


def run_or_reuse(stage: str, run_dir: Path, inputs: dict[str, Path], force: bool = False) -> dict[str, Any]:
    """Skip the stage on a cache hit, else run it; record and return status, seconds, metrics, artifact."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / CONFIG)
    out = run_dir / stage
    started = time.time()
    record_status(run_dir, stage, status="running")
    try:
        key = stage_provenance(stage, cfg, inputs)["cache_key"]
        cache = ArtifactCache()
        if not force and artifacts.is_finished(out) and artifacts.read_manifest(out).get("cache_key") == key:
            status = "cached"  # this run already holds the finished artifact (a resumed or repeated run)
        elif not force and cache.lookup(key) is not None:
            cache.restore(key, out)
            status = "cached"
        else:
            launch_stage(stage, run_dir, inputs)
            cache.store(key, out)
            status = "completed"
    except BaseException as err:  # a kill (KeyboardInterrupt) is recorded too, then re-raised
        record_status(run_dir, stage, status="failed", seconds=round(time.time() - started, 2), error=str(err))
        raise
    seconds = round(time.time() - started, 2)
    record_status(run_dir, stage, status=status, seconds=seconds)
    manifest = artifacts.read_manifest(out)
    return {"status": status, "seconds": seconds, "metrics": manifest["metrics"], "artifact": str(out)}


def launch_stage(stage: str, run_dir: Path, inputs: dict[str, Path]) -> None:
    """Run ``python -m stages.<stage>`` for this run, streaming and logging its output."""
    command = [
        sys.executable, "-m", f"stages.{stage}", "--config", str(run_dir / CONFIG), "--out", str(run_dir / stage),
        *(f"--input={name}={path}" for name, path in inputs.items()),
    ]
    log_path = run_dir / "logs" / f"{stage}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            assert process.stdout is not None
            # read1 returns whatever is available, so "\r" progress-bar updates show as they happen.
            for chunk in iter(lambda: process.stdout.read1(65536), b""):
                log.write(chunk)
                sys.stdout.write(decoder.decode(chunk))
                sys.stdout.flush()
            code = process.wait()
        except BaseException:
            process.terminate()  # never leave an orphaned trainer behind
            process.wait()
            raise
    if code != 0:
        raise StageFailed(f"stage {stage} failed (exit status {code}): {_last_line(log_path)} [log: {log_path}]")


def _last_line(log_path: Path) -> str:
    lines = [line.strip() for line in log_path.read_text(errors="replace").replace("\r", "\n").splitlines()]
    return next((line for line in reversed(lines) if line), "no output")
