"""Test session setup: an isolated RLHF_HOME per session that shares only the built-in backbone build.

The backbone build (about two minutes on 2 cores) is cached in the repository's ``.rlhf/backbones`` so
``make test`` and ``make run`` build it once between them; everything else (cache, Prefect state, runs)
lives in a fresh temporary folder, so tests never see each other's or a user's state.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# A few steps and prompts: enough to prove behaviour, small enough for a 2-core CI machine.
TINY = ["sft.max_steps=3", "sft.logging_steps=1", "eval.num_prompts=8", "task.num_sft=32", "task.num_pairs=32",
        "reward.max_steps=4", "reward.batch_size=4", "reward.logging_steps=1", "ppo.updates=2",
        "ppo.rollout_prompts=4", "ppo.minibatch_size=2", "ppo.ppo_epochs=1", "ppo.max_new_tokens=8",
        "rrhf.max_steps=3", "rrhf.num_prompts=6", "rrhf.batch_size=3", "rrhf.num_candidates=3", "rrhf.logging_steps=1"]


@pytest.fixture(scope="session", autouse=True)
def rlhf_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("rlhf_home")
    shared = REPO / ".rlhf" / "backbones"
    shared.mkdir(parents=True, exist_ok=True)
    (home / "backbones").symlink_to(shared, target_is_directory=True)
    os.environ["RLHF_HOME"] = str(home)
    os.environ["PREFECT_HOME"] = str(home / "prefect")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ["WANDB_MODE"] = "offline"
    os.environ["HF_HUB_OFFLINE"] = "1"  # no hub here: fail at once instead of retrying for 25 s
    return home


def run_cli(*args: str, cwd: Path, timeout: int = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real ``rlhf`` console script in a child process, as a user would."""
    rlhf = Path(sys.executable).parent / "rlhf"
    return subprocess.run([str(rlhf), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
