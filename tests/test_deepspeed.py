"""DeepSpeed ZeRO through `accelerate launch`, for real: 2 CPU processes on the gloo backend.

Each trained adapter is reloaded here, in a process that took no part in training, with plain PEFT, and
must reproduce the logits the training job recorded when it saved it (``probe_logits.safetensors``).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stages import artifacts
from stages.config import load_config
from stages.launch import launch_env
from stages.probes import PROBE_FILE
from tests.conftest import TINY, run_cli, stage_command, train_upstream

LIMIT_S = 600  # every launch is time-bound: a failure must end the process, never hang it
DS = [*TINY, "tracking.backend=none"]


def _launch(stage: str, out: Path, sets: list[str], inputs: dict[str, Path] | None = None) -> None:
    result = subprocess.run(stage_command(stage, out, sets, inputs), env=launch_env(load_config(None, sets)),
                            capture_output=True, text=True, timeout=LIMIT_S)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert artifacts.read_manifest(out)["engine"] == {"name": f"deepspeed-zero{_zero(sets)}", "world_size": 2}


def _zero(sets: list[str]) -> int:
    preset = load_config(None, sets).distributed.deepspeed
    return 3 if preset.startswith("zero3") else 2


def _assert_reloads_with_plain_peft(artifact: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from stages.builtin_backbone import ensure_builtin_backbone

    base = AutoModelForCausalLM.from_pretrained(ensure_builtin_backbone(), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, artifact / "adapter").eval()
    probe = load_file(str(artifact / PROBE_FILE))
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    assert torch.allclose(logits, probe["logits"], atol=1e-5), (logits - probe["logits"]).abs().max()


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return train_upstream(tmp_path_factory.mktemp("upstream"), DS)


@pytest.mark.parametrize("preset", ["zero2", "zero3"])
def test_sft_under_deepspeed(preset: str, tmp_path: Path) -> None:
    sets = [*DS, "sft.launcher=accelerate", f"distributed.deepspeed={preset}", "tracking.backend=wandb"]
    _launch("sft", tmp_path / "sft", sets)
    _assert_reloads_with_plain_peft(tmp_path / "sft")
    _assert_one_wandb_run(tmp_path / "wandb", "sft")


def _assert_one_wandb_run(folder: Path, stage: str) -> None:
    """Rank 0 alone tracks: one offline W&B run for the stage, finished, with the stage's metrics."""
    runs = sorted(folder.glob("offline-run-*"))
    assert len(runs) == 1, runs
    wandb_cli = Path(sys.executable).parent / "wandb"
    summary = json.loads(subprocess.run([str(wandb_cli), "leet", "inspect", "--summary", "--json", str(runs[0])],
                                        capture_output=True, text=True, check=True).stdout)
    assert summary["state"] == "finished" and "task_score" in summary["summary"] and "train/loss" in summary["summary"]


def test_reward_under_zero2_scores_the_same_in_a_fresh_process(tmp_path: Path) -> None:
    from stages.backbone import load_backbone
    from stages.reward import attach_reward

    _launch("reward", tmp_path / "reward", [*DS, "reward.launcher=accelerate"])
    backbone = load_backbone(load_config(None, DS).backbone)
    attach_reward(backbone.model, tmp_path / "reward", backbone.tokenizer, backbone.fingerprint)  # re-scores its probes


def test_ppo_under_zero2(upstream: dict[str, Path], tmp_path: Path) -> None:
    _launch("ppo", tmp_path / "ppo", [*DS, "ppo.launcher=accelerate", "ppo.rollout_prompts=2"], upstream)
    _assert_reloads_with_plain_peft(tmp_path / "ppo")
    history = json.loads((tmp_path / "ppo" / "history.json").read_text())
    assert [row["update"] for row in history] == [1, 2]


def test_rrhf_under_zero2(upstream: dict[str, Path], tmp_path: Path) -> None:
    _launch("rrhf", tmp_path / "rrhf", [*DS, "rrhf.launcher=accelerate"], upstream)
    _assert_reloads_with_plain_peft(tmp_path / "rrhf")


def test_a_config_deepspeed_rejects_fails_the_stage_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2, "bogus": 1}}))
    result = run_cli("run", "--run-id", "bad-ds", "--set", "run.stages=[sft]", "--set", "sft.launcher=accelerate",
                     "--set", f"distributed.deepspeed={bad}", *(a for s in DS for a in ("--set", s)),
                     cwd=tmp_path, timeout=LIMIT_S)
    assert result.returncode == 1, result.stdout[-3000:]
    assert f"stage sft failed (exit status 1): error: distributed.deepspeed: {bad}: DeepSpeed rejects it: bogus" \
        in result.stderr, result.stderr[-2000:]
    assert not artifacts.is_finished(tmp_path / "runs" / "bad-ds" / "sft")  # (run_cli's timeout is the time bound)


def test_a_launch_whose_machines_never_join_fails_instead_of_hanging(tmp_path: Path) -> None:
    sets = [*DS, "sft.launcher=accelerate", "distributed.num_machines=2", "distributed.main_process_ip=127.0.0.1",
            "distributed.main_process_port=29731", "distributed.join_timeout_s=10"]
    result = run_cli("run", "--run-id", "lonely", "--set", "run.stages=[sft]", *(a for s in sets for a in ("--set", s)),
                     cwd=tmp_path, timeout=120)
    assert result.returncode == 1
    assert "waiting for clients. 1/2 clients joined" in result.stderr, result.stderr[-2000:]


def test_sampling_stages_under_zero3_are_refused_before_launch(tmp_path: Path) -> None:
    result = run_cli("run", "--set", "ppo.launcher=accelerate", "--set", "distributed.deepspeed=zero3", cwd=tmp_path)
    assert result.returncode == 2
    assert "ppo.launcher: accelerate with ZeRO-3 (zero3) is not supported" in result.stderr
    assert not (tmp_path / "runs").exists()
