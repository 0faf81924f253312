"""The log-prob gap monitor (stages/training/logprob_gap.py) and the sampling it watches: a model's own
generation_config never reaches sampling (issue 28, fault 2), the gap of a clean run is float noise, and a
run that samples from another distribution than it trains on is caught in its history and warned about."""

from pathlib import Path

import pytest
import torch

from stages.io.config import load_config
from stages.model.adapters import active_adapter
from stages.model.backbone import ignored_generation_settings
from stages.model.generation import generate
from stages.model.sequences import sampled_batch, token_logprobs
from stages.ppo.recipe import ppo_update, ppo_updater, train_ppo
from stages.ppo.rollout import POLICY, build_models, collect_rollout
from stages.training.logprob_gap import GAP_LIMITS, gap_warning
from stages.training.runner import execute
from tests.conftest import TINY, train_upstream

FAST = [*TINY, "ppo.checkpoint_every=10"]
PROMPTS = ["3+4=", "12+9=", "5+5=", "7+1="]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return train_upstream(tmp_path_factory.mktemp("gap"), FAST)


def _sampling_gap(models, temperature: float) -> float:
    """Largest |log-prob at sampling - log-prob in a training forward| over PROMPTS' sampled tokens."""
    tokenization = models.tokenization
    samples = generate(
        models.model,
        tokenization,
        [tokenization.prompt_ids(p) for p in PROMPTS],
        max_new_tokens=8,
        temperature=temperature,
        batch_size=4,
        seed=0,
    )
    batch, sampled = sampled_batch(samples, tokenization.pad_id, "cpu")
    with torch.no_grad():
        trained = token_logprobs(models.model, batch, temperature)
    return ((sampled - trained).abs() * batch.response_mask).max().item()


def test_a_models_generation_config_does_not_change_what_is_sampled(inputs: dict[str, Path]) -> None:
    models = build_models(load_config(None, FAST), inputs)
    config = models.model.get_base_model().generation_config
    clean = _sampling_gap(models, 1.0)
    # Qwen2.5-Instruct's hub defaults, and a penalty strong enough to move every repeated digit.
    config.update(repetition_penalty=1.5, top_k=20, top_p=0.8, temperature=0.7, no_repeat_ngram_size=2)
    assert ignored_generation_settings(config) == {
        "temperature": 0.7,
        "top_k": 20,
        "top_p": 0.8,
        "repetition_penalty": 1.5,
        "no_repeat_ngram_size": 2,
    }
    assert _sampling_gap(models, 1.0) == pytest.approx(clean, abs=1e-6) and clean < GAP_LIMITS["float32"].largest
    assert config.repetition_penalty == 1.5  # restored after sampling (export keeps it)


def test_the_gap_of_a_clean_update_is_float_noise_and_a_mismatched_one_warns(inputs: dict[str, Path]) -> None:
    cfg = load_config(None, FAST)
    models = build_models(cfg, inputs)
    rollout, _ = collect_rollout(models, PROMPTS, cfg.ppo, kl_coef=0.1, seed=0)
    clean = ppo_update(models, rollout, ppo_updater(models, cfg.ppo), cfg.ppo, torch.Generator().manual_seed(0))
    assert 0 <= clean["logprob_gap_mean"] <= clean["logprob_gap_max"] < GAP_LIMITS["float32"].largest
    assert gap_warning([clean], "float32", "ppo") is None
    # Sampled at 0.5, trained at the configured 1.0: the distributions differ, as a penalty's did.
    colder = load_config(None, [*FAST, "ppo.temperature=0.5"])
    rollout, _ = collect_rollout(models, PROMPTS, colder.ppo, kl_coef=0.1, seed=0)
    mismatched = ppo_update(models, rollout, ppo_updater(models, cfg.ppo), cfg.ppo, torch.Generator().manual_seed(0))
    assert mismatched["logprob_gap_max"] > 100 * GAP_LIMITS["float32"].largest
    assert "differ from the training forward's by up to" in gap_warning([clean, mismatched], "float32", "ppo")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_the_gap_counts_only_forwards_before_the_updates_first_step(
    inputs: dict[str, Path], temperature: float
) -> None:
    """With accumulation (2 minibatches per step), 3 epochs and a learning rate that moves the log-probs
    by far more than float noise after one step, the gap stays noise: only the forwards before the first
    optimizer step are measured. At T=0.7 both sides divide by the same temperature."""
    cfg = load_config(
        None,
        [
            *FAST,
            f"ppo.temperature={temperature}",
            "ppo.minibatch_size=2",
            "ppo.gradient_accumulation=2",
            "ppo.ppo_epochs=3",
            "ppo.learning_rate=0.05",
        ],
    )
    models = build_models(cfg, inputs)
    rollout, _ = collect_rollout(models, PROMPTS, cfg.ppo, kl_coef=0.1, seed=0)
    stats = ppo_update(models, rollout, ppo_updater(models, cfg.ppo), cfg.ppo, torch.Generator().manual_seed(0))
    assert stats["minibatches"] == 6 and stats["logprob_gap_max"] < GAP_LIMITS["float32"].largest, stats
    with torch.no_grad(), active_adapter(models.model, POLICY):  # a forward after a step would have shown a gap
        moved = token_logprobs(models.model, rollout.batch, temperature)
    assert ((moved - rollout.old_logprobs).abs() * rollout.response_mask).max() > 10 * GAP_LIMITS["float32"].largest


def test_the_gap_is_in_the_history_of_ppo_and_grpo_and_in_rrhfs_metrics(
    inputs: dict[str, Path], tmp_path: Path
) -> None:
    import json

    from stages.grpo.recipe import train_grpo

    cfg = load_config(None, FAST)
    for stage, train in (("ppo", train_ppo), ("grpo", train_grpo)):
        manifest = execute(stage, train, cfg, tmp_path / stage, inputs)
        history = json.loads((tmp_path / stage / "history.json").read_text())
        assert all(0 <= row["logprob_gap_max"] < GAP_LIMITS["float32"].largest for row in history), history
        assert not [w for w in manifest["metrics"]["warnings"] if "log-probs" in w]
    from stages.rrhf.recipe import train_rrhf  # samples its candidates once: the gap of those, in its metrics

    metrics = execute("rrhf", train_rrhf, cfg, tmp_path / "rrhf", inputs)["metrics"]
    assert 0 <= metrics["logprob_gap_mean"] <= metrics["logprob_gap_max"] < GAP_LIMITS["float32"].largest
