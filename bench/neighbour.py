"""The default PPO stage alone, then beside a CPU-bound neighbour: how much a shared machine slows it.

    python bench/neighbour.py                       # about 20 minutes on 2 cores, quiet machine first
    python bench/neighbour.py --variants "OMP_WAIT_POLICY=PASSIVE;GOMP_SPINCOUNT=20000"

The PPO stage runs as the flow runs it (``python -m stages.training.entry ppo`` with ``flows.launch.launch_env``), on
SFT and reward artifacts built once. The neighbour is another training-like job: a torch matmul loop
using every core. Each variant of the stage's OpenMP environment (``OMP_WAIT_POLICY``, libgomp's
``GOMP_SPINCOUNT``, thread counts) is timed alone and beside the neighbour; the ratio is what a user
sees when a second job shares the machine (target: <= 2x). ``default`` is the environment the flow
gives the stage today.
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
NEIGHBOUR = """
import torch
torch.set_num_threads(max(1, __import__("os").cpu_count()))
a = torch.randn(768, 768)
while True:
    a = torch.tanh(a @ a)
"""


def stage(name: str, out: Path, env: dict[str, str], inputs: dict[str, Path] | None = None) -> float:
    command = [
        sys.executable,
        "-m",
        "stages.training.entry",
        name,
        "--out",
        str(out),
        "--set",
        "tracking.backend=none",
        *(f"--input={k}={v}" for k, v in (inputs or {}).items()),
    ]
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    return time.perf_counter() - started


def main() -> None:
    from flows.launch import launch_env
    from stages.io.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--variants",
        default="default;OMP_WAIT_POLICY=PASSIVE;GOMP_SPINCOUNT=20000",
        help="';'-separated variants, each 'default' or comma-separated KEY=VALUE settings",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        home = root / "home"
        home.mkdir()
        (home / "backbones").symlink_to(REPO / ".rlhf" / "backbones", target_is_directory=True)
        base = {**launch_env(load_config(None, []), "ppo"), "RLHF_HOME": str(home)}
        stage("sft", root / "sft", base)
        stage("reward", root / "reward", base)
        upstream = {"sft": root / "sft", "reward": root / "reward"}
        print(f"{'variant':>28} {'alone s':>8} {'beside s':>9} {'ratio':>6}", flush=True)
        for n, variant in enumerate(args.variants.split(";")):
            settings = {} if variant == "default" else dict(kv.split("=", 1) for kv in variant.split(","))
            env = {**base, **settings}
            alone = stage("ppo", root / f"ppo-{n}-alone", env, upstream)
            neighbour = subprocess.Popen(
                [sys.executable, "-c", NEIGHBOUR], env={**os.environ, "OMP_NUM_THREADS": str(os.cpu_count())}
            )
            try:
                time.sleep(3)  # let it reach its loop
                beside = stage("ppo", root / f"ppo-{n}-beside", env, upstream)
            finally:
                neighbour.kill()
                neighbour.wait()
            print(f"{variant:>28} {alone:>8.1f} {beside:>9.1f} {beside / alone:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
