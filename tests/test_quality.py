"""The acceptance numbers on the built-in task, with the shipped configs, through the real CLI.

Deterministic (fixed seeds, CPU kernels), and the margins are wide (measured: PPO +0.25 and RRHF +0.17
over SFT), so a failure here means a real regression in a stage, not noise.
"""

import json
from pathlib import Path

from tests.conftest import REPO, run_cli


def _report(run_id: str, cwd: Path) -> dict:
    return json.loads(run_cli("report", run_id, "--json", cwd=cwd).stdout)["stages"]


def test_default_chain_and_rrhf_variant_beat_sft(tmp_path: Path) -> None:
    ppo_run = run_cli("run", "--run-id", "ppo", cwd=tmp_path, timeout=1200)
    assert ppo_run.returncode == 0, ppo_run.stdout[-3000:] + ppo_run.stderr[-3000:]
    stages = _report("ppo", tmp_path)
    sft, reward, ppo = (stages[s]["metrics"] for s in ("sft", "reward", "ppo"))
    assert sft["task_score_before"] < 0.05 < sft["task_score"]
    assert reward["pair_accuracy"] >= 0.9
    assert ppo["task_score"] >= sft["task_score"] + 0.10, (ppo["task_score"], sft["task_score"])

    rrhf_run = run_cli("run", "--config", str(REPO / "configs" / "sft-reward-rrhf.yaml"), "--run-id", "rrhf",
                       cwd=tmp_path, timeout=1200)
    assert rrhf_run.returncode == 0, rrhf_run.stderr[-3000:]
    stages = _report("rrhf", tmp_path)
    assert stages["sft"]["status"] == "cached" and stages["reward"]["status"] == "cached"
    rrhf = stages["rrhf"]["metrics"]
    assert rrhf["task_score_sft"] == sft["task_score"]
    assert rrhf["task_score"] >= sft["task_score"] + 0.10, (rrhf["task_score"], sft["task_score"])
