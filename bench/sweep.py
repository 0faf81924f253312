"""A 2x2 PPO sweep's wall time against running the same four trials as separate runs without the cache.

    python bench/sweep.py [--set KEY=VALUE ...]      # the default chain, a fresh cache, the shared backbone

The sweep (`rlhf sweep`, grid over ppo.learning_rate x ppo.kl_coef) trains SFT and the reward model once
and reuses them in every trial; the baseline is four `rlhf run --force sft` (every stage recomputed), one
per setting, in the same script on the same machine. Reported: both wall times and their ratio.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GRID = {"ppo.learning_rate": ["1e-4", "5e-4"], "ppo.kl_coef": ["0.05", "0.2"]}


def timed(args: list[str], cwd: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(
        [str(Path(sys.executable).parent / "rlhf"), *args],
        cwd=cwd,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="overrides", action="append", default=["tracking.backend=none"])
    sets = [arg for item in parser.parse_args().overrides for arg in ("--set", item)]
    subprocess.run(
        [str(Path(sys.executable).parent / "rlhf"), "build-backbone"], cwd=REPO, check=True, stdout=subprocess.DEVNULL
    )
    with tempfile.TemporaryDirectory() as scratch:
        home = Path(scratch) / "home"
        home.mkdir()
        (home / "backbones").symlink_to(REPO / ".rlhf" / "backbones", target_is_directory=True)
        env = {**os.environ, "RLHF_HOME": str(home), "PREFECT_HOME": str(home / "prefect")}
        grid = [arg for key, values in GRID.items() for arg in ("--grid", f"{key}=[{','.join(values)}]")]
        sweep = timed(["sweep", *sets, *grid, "--metric", "ppo.task_score", "--name", "bench"], Path(scratch), env)
        separate = 0.0
        for i, (lr, kl) in enumerate((lr, kl) for lr in GRID["ppo.learning_rate"] for kl in GRID["ppo.kl_coef"]):
            separate += timed(
                [
                    "run",
                    *sets,
                    "--set",
                    f"ppo.learning_rate={lr}",
                    "--set",
                    f"ppo.kl_coef={kl}",
                    "--run-id",
                    f"separate-{i}",
                    "--force",
                    "sft",
                ],
                Path(scratch),
                env,
            )
    print(f"2x2 sweep (SFT and reward trained once):        {sweep:7.1f} s")
    print(f"the same 4 trials as separate uncached runs:    {separate:7.1f} s")
    print(f"sweep / separate:                               {sweep / separate:7.2f}")


if __name__ == "__main__":
    main()
