"""Wall time of the default chain on a warm backbone cache, then of the same run with every stage cached.

    python bench/orchestration.py            # uses ./.rlhf/backbones (built if missing), a fresh cache

Targets: full default chain <= 5 minutes; the all-cached rerun <= 10% of the full chain's wall time in the
same run (issue 15, item 4). The all-cached figure is the orchestrator's own overhead: CLI start, config
and dataset validation, Prefect's temporary server, cache lookups and the report.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed_run(run_id: str, cwd: Path, env: dict[str, str]) -> float:
    rlhf = Path(sys.executable).parent / "rlhf"
    started = time.perf_counter()
    subprocess.run(
        [str(rlhf), "run", "--run-id", run_id],
        cwd=cwd,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


def main() -> None:
    subprocess.run(
        [str(Path(sys.executable).parent / "rlhf"), "build-backbone"], cwd=REPO, check=True, stdout=subprocess.DEVNULL
    )
    with tempfile.TemporaryDirectory() as scratch:
        home = Path(scratch) / "home"
        home.mkdir()
        (home / "backbones").symlink_to(REPO / ".rlhf" / "backbones", target_is_directory=True)
        env = {**os.environ, "RLHF_HOME": str(home), "PREFECT_HOME": str(home / "prefect")}
        full = timed_run("full", Path(scratch), env)
        cached = timed_run("cached", Path(scratch), env)
    print(f"full default chain (warm backbone, cold cache): {full:7.1f} s   target <= 300 s")
    print(f"same config again, every stage cached:          {cached:7.1f} s")
    print(f"ratio cached / full: {cached / full:.3f}   target <= 0.10")


if __name__ == "__main__":
    main()
