"""GRPO on one backbone: every adapter kind trains the policy adapter alone, with the reference, the reward
model and the base unchanged and held once; the checker-only chain needs no reward stage; a user's
checker that misbehaves stops the stage in one line. (Losses: tests/test_losses.py; kill and resume:
tests/test_resume.py; ZeRO-2: tests/test_deepspeed.py; the quality bar: tests/test_quality.py.)"""

import os
import subprocess
from pathlib import Path

import pytest
import torch

from stages.grpo.recipe import POLICY, REFERENCE, build_model, grpo_step, sample_groups, train_grpo
from stages.io import artifacts
from stages.io.config import load_config
from stages.model.backbone import load_backbone
from stages.model.reward_model import ADAPTER_NAME as REWARD
from stages.training.runner import execute
from stages.training.updater import Updater
from tests.conftest import TINY, base_elements, stage_command, train_upstream

FAST = [
    *TINY,
    "tracking.backend=none",
    "grpo.max_steps=2",
    "grpo.prompts_per_step=3",
    "grpo.num_generations=3",
    "grpo.minibatch_size=4",
    "grpo.max_new_tokens=8",
    "grpo.checkpoint_every=1",
]


def _adapter(model: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if f".{name}." in n}


@pytest.mark.parametrize("kind", ["lora", "qlora", "ptuning_v2"])
def test_grpo_trains_only_the_policy_on_one_backbone(kind: str, tmp_path: Path) -> None:
    sets = [
        *FAST,
        f"adapter.kind={kind}",
        "grpo.learning_rate=0.01",
        "grpo.num_iterations=2",
        "grpo.scale_rewards=true",
    ]
    inputs = train_upstream(tmp_path, sets)
    cfg = load_config(None, sets)
    model, tokenization, source, _ = build_model(cfg, inputs)
    assert source.uses_model and set(model.peft_config) == {REFERENCE, POLICY, REWARD}
    before = {name: _adapter(model, name) for name in (REFERENCE, POLICY, REWARD)}
    updater = Updater(model, cfg.grpo.learning_rate, 0, 4, schedule="constant")
    batch, old_logprobs, rewards, stats = sample_groups(
        model, tokenization, source, ["3+4=", "12+9=", "1+1="], cfg.grpo, 0
    )
    assert batch.input_ids.shape[0] == rewards.shape[0] == 9 and stats["reward_std"] >= 0
    grpo_step(model, batch, old_logprobs, rewards, updater, cfg.grpo, torch.Generator().manual_seed(0))

    after = {name: _adapter(model, name) for name in before}
    assert all(torch.equal(after[n][k], before[n][k]) for n in (REFERENCE, REWARD) for k in before[n])
    assert any(not torch.equal(after[POLICY][k], v) for k, v in before[POLICY].items())
    # One copy of the base: the unique storages behind the base weights hold exactly one backbone.
    assert base_elements(model) == base_elements(load_backbone(cfg.backbone, quantize_4bit=kind == "qlora").model)


def test_the_first_pass_over_fresh_samples_is_on_policy(tmp_path: Path) -> None:
    """Generation's log-probs are the policy's at the sampling temperature: before any update, the ratio
    is 1 and nothing is clipped (the policy and its reference are both SFT: KL 0)."""
    sets = [*FAST, "grpo.temperature=0.7", "grpo.minibatch_size=9"]
    inputs = train_upstream(tmp_path, sets)
    cfg = load_config(None, sets)
    model, tokenization, source, _ = build_model(cfg, inputs)
    batch, old_logprobs, rewards, _ = sample_groups(model, tokenization, source, ["3+4=", "12+9=", "1+1="], cfg.grpo, 0)
    stats = grpo_step(
        model,
        batch,
        old_logprobs,
        rewards,
        Updater(model, 0.0, 0, 1, schedule="constant"),
        cfg.grpo,
        torch.Generator().manual_seed(0),
    )
    assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-5) and stats["clipfrac"] == 0.0
    assert stats["approx_kl"] == pytest.approx(0.0, abs=1e-5) and stats["kl"] == pytest.approx(0.0, abs=1e-5)


def test_model_plus_checker_is_the_weighted_sum_of_the_real_reward_model_and_the_checker(tmp_path: Path) -> None:
    """The same samples (same seed) scored three ways: model+checker = 2 x model + 0.5 x checker (with no
    missing-EOS penalty, which each source subtracts once)."""
    inputs = train_upstream(tmp_path, FAST)
    found = {}
    for reward in ("model", "checker", "model+checker"):
        cfg = load_config(
            None,
            [
                *FAST,
                f"grpo.reward={reward}",
                "grpo.model_weight=2",
                "grpo.checker_weight=0.5",
                "grpo.missing_eos_penalty=0",
            ],
        )
        model, tokenization, source, _ = build_model(cfg, inputs)
        found[reward] = sample_groups(model, tokenization, source, ["3+4=", "12+9="], cfg.grpo, seed=5)[2]
    assert torch.allclose(found["model+checker"], 2 * found["model"] + 0.5 * found["checker"], atol=1e-4)
    assert set(found["checker"].tolist()) <= {0.0, 1.0}


def test_the_checker_chain_runs_without_a_reward_stage(tmp_path: Path) -> None:
    sets = [*FAST, "run.stages=[sft,grpo]", "grpo.reward=checker", "sft.max_steps=40", "grpo.prompts_per_step=6"]
    sft = train_upstream(tmp_path, sets)["sft"]
    metrics = execute("grpo", train_grpo, load_config(None, sets), tmp_path / "grpo", {"sft": sft})["metrics"]
    assert metrics["reward_source"] == "checker" and metrics["warnings"] == [], metrics["warnings"]
    assert metrics["task_score_sft"] == artifacts.read_manifest(sft)["metrics"]["task_score"]
    assert 0.0 <= metrics["task_score"] <= 1.0 and "kl_to_reference" in metrics
    # With the built-in checker, a response's reward is 1 for the exact sum minus the missing-EOS penalty.
    assert -1.0 <= metrics["policy_reward"] <= 1.0
    history = (tmp_path / "grpo" / "history.json").read_text()
    assert '"step": 2' in history and '"reward_std"' in history


def test_a_checker_that_returns_the_wrong_length_stops_the_stage_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "bad_checker.py").write_text(
        "def score(prompts, completions):\n    return [1.0] * (len(completions) - 1)\n"
    )
    sets = [*FAST, "run.stages=[sft,grpo]", "grpo.reward=checker", "grpo.checker=bad_checker:score"]
    sft = train_upstream(tmp_path, sets)["sft"]
    result = subprocess.run(
        stage_command("grpo", tmp_path / "grpo", sets, {"sft": sft}),
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: checker 'bad_checker:score' returned 8 rewards for 9 responses"
    )
    assert "Traceback" not in result.stderr and not artifacts.is_finished(tmp_path / "grpo")


def test_tied_rewards_at_every_step_are_reported(tmp_path: Path) -> None:
    """A base-like SFT answers nothing right: the checker gives every sample 0, so nothing can train."""
    sets = [*FAST, "run.stages=[sft,grpo]", "grpo.reward=checker", "sft.max_steps=1"]
    sft = train_upstream(tmp_path, sets)["sft"]
    warnings = execute("grpo", train_grpo, load_config(None, sets), tmp_path / "grpo", {"sft": sft})["metrics"][
        "warnings"
    ]
    assert any("every group's rewards were tied at every step" in w for w in warnings), warnings
