"""Reward and RRHF stages on the shared backbone: head integrity, offline ranked data, batch > 1."""

import json
from pathlib import Path

import pytest
import torch

from stages.io import artifacts
from stages.io.config import load_config
from stages.io.sections import needs_4bit
from stages.model.backbone import load_backbone
from stages.model.heads import SCORE_HEAD, sequence_scores
from stages.model.reward_model import PROBES, attach_reward
from stages.model.tokenization import Tokenization
from stages.ppo.recipe import train_ppo
from stages.reward.recipe import train_reward
from stages.rrhf.recipe import train_rrhf
from stages.sft.recipe import train_sft
from stages.training.runner import execute
from tests.conftest import TINY

FAST = TINY


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stages")
    cfg = load_config(None, FAST)
    execute("sft", train_sft, cfg, root / "sft", {})
    execute("reward", train_reward, cfg, root / "reward", {})
    return {"sft": root / "sft", "reward": root / "reward"}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["lora", "qlora", "ptuning_v2"])
def test_a_reward_model_reloads_as_trained_for_ppo_and_rrhf(kind: str, dtype: str, tmp_path: Path) -> None:
    """Issue 14, fault 3, per adapter kind x dtype: a fresh backbone, loaded as PPO and RRHF load it, with
    the reward adapter and its saved head scores the reward stage's probe texts exactly as the reward stage
    did (QLoRA's k-bit preparation belongs to loading the backbone, so every stage gets it), and PPO and
    RRHF accept the artifact (their probe check refuses a gap over 1e-4; QLoRA in bf16 was 8.3e-3 off)."""
    cfg = load_config(None, [*FAST, f"adapter.kind={kind}", f"backbone.dtype={dtype}", "tracking.backend=none"])
    execute("sft", train_sft, cfg, tmp_path / "sft", {})
    manifest = execute("reward", train_reward, cfg, tmp_path / "reward", {})
    assert manifest["metrics"]["eval_pairs"] > 0 and (tmp_path / "reward" / SCORE_HEAD).is_file()

    backbone = load_backbone(cfg.backbone, quantize_4bit=needs_4bit(kind))  # one backbone, no second model
    tokenization = Tokenization.of(backbone.tokenizer)
    model, head = attach_reward(backbone.model, tmp_path / "reward", tokenization, backbone.fingerprint)
    probes = json.loads((tmp_path / "reward" / PROBES).read_text())
    with torch.no_grad():
        scores = sequence_scores(
            model, head, tokenization.batch([p["prompt"] for p in probes], [p["response"] for p in probes], "cpu")
        )
    torch.testing.assert_close(scores, torch.tensor([p["score"] for p in probes]), rtol=0, atol=0)
    upstream = {"sft": tmp_path / "sft", "reward": tmp_path / "reward"}
    for stage, train in (("ppo", train_ppo), ("rrhf", train_rrhf)):
        assert execute(stage, train, cfg, tmp_path / stage, upstream) is not None


def test_missing_or_foreign_head_is_a_clear_error(trained: dict[str, Path], tmp_path: Path) -> None:
    cfg = load_config(None, FAST)
    broken = tmp_path / "reward"
    artifacts.copy_artifact(trained["reward"], broken)
    (broken / SCORE_HEAD).unlink()
    backbone = load_backbone(cfg.backbone)
    with pytest.raises(artifacts.ArtifactError, match="head is missing"):
        attach_reward(backbone.model, broken, Tokenization.of(backbone.tokenizer), backbone.fingerprint)

    swapped = tmp_path / "swapped"
    artifacts.copy_artifact(trained["reward"], swapped)
    from safetensors.torch import save_file

    save_file(
        {"weight": torch.randn(1, 128), "bias": torch.zeros(1)},
        str(swapped / SCORE_HEAD),
        metadata={"backbone_fingerprint": backbone.fingerprint},
    )
    with pytest.raises(artifacts.ArtifactError, match="does not match"):
        attach_reward(
            load_backbone(cfg.backbone).model, swapped, Tokenization.of(backbone.tokenizer), backbone.fingerprint
        )


def test_reward_artifact_tokenized_differently_is_refused(trained: dict[str, Path]) -> None:
    """A later stage whose tokenizer puts BOS in front (the reward stage's did not) would score other ids
    than the reward model was trained on: refused before any reward is computed."""
    import copy

    from tokenizers import processors

    backbone = load_backbone(load_config(None, FAST).backbone)
    tokenizer = copy.deepcopy(backbone.tokenizer)
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tokenizer.bos_token_id)]
    )
    with pytest.raises(
        artifacts.ArtifactError,
        match="into other ids than the reward stage did; the tokenizer or data.chat_template differs",
    ):
        attach_reward(backbone.model, trained["reward"], Tokenization.of(tokenizer), backbone.fingerprint)


def test_rrhf_with_reward_model_and_batch_above_one(trained: dict[str, Path], tmp_path: Path) -> None:
    cfg = load_config(None, [*FAST, "run.stages=[sft,reward,rrhf]"])
    manifest = execute("rrhf", train_rrhf, cfg, tmp_path / "rrhf", dict(trained))
    metrics = manifest["metrics"]
    assert metrics["groups"] == 6 and cfg.rrhf.batch_size == 3
    for key in ("task_score", "task_score_sft", "ranking_accuracy", "policy_reward"):
        assert key in metrics, key
    history = json.loads((tmp_path / "rrhf" / "history.json").read_text())
    assert history and all(row["rank_loss"] >= 0 and row["sft_loss"] > 0 for row in history)
    from peft import PeftModel

    base = load_backbone(cfg.backbone).model
    PeftModel.from_pretrained(base, str(tmp_path / "rrhf" / "adapter"))  # a plain PEFT folder


def test_rrhf_on_offline_ranked_data_needs_no_reward(trained: dict[str, Path], tmp_path: Path) -> None:
    ranked = tmp_path / "ranked.jsonl"
    rows = [
        {"query": "3+4=", "responses": ["7", "8", "6"], "scores": [1.0, -1.0, -1.0]},
        {"query": "12+9=", "responses": ["21", "11"], "scores": [2.0, 0.5]},  # ragged: 2 candidates
        {"query": "5+5=", "responses": ["10"], "scores": [1.0]},  # a single candidate
    ]
    ranked.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = load_config(None, [*FAST, "run.stages=[sft,rrhf]", f"data.ranked={ranked}"])
    manifest = execute("rrhf", train_rrhf, cfg, tmp_path / "rrhf", {"sft": trained["sft"]})
    assert manifest["metrics"]["groups"] == 3 and "policy_reward" not in manifest["metrics"]
    assert "reward" not in manifest["input_digests"]


def test_rrhf_on_the_checker_needs_no_reward(tmp_path: Path) -> None:
    """rrhf.reward=checker: the candidates are ranked by the built-in checker, with no reward stage."""
    sets = [*FAST, "run.stages=[sft,rrhf]", "rrhf.reward=checker", "sft.max_steps=40"]
    cfg = load_config(None, sets)
    execute("sft", train_sft, cfg, tmp_path / "sft", {})
    manifest = execute("rrhf", train_rrhf, cfg, tmp_path / "rrhf", {"sft": tmp_path / "sft"})
    metrics = manifest["metrics"]
    assert "reward" not in manifest["input_digests"] and metrics["warnings"] == [], metrics["warnings"]
    assert -1.0 <= metrics["candidate_reward"] <= 1.0 and -1.0 <= metrics["policy_reward"] <= 1.0


def test_rrhf_needs_a_reward_source() -> None:
    from stages.io.config import ConfigError

    with pytest.raises(ConfigError, match="rrhf needs the reward stage"):
        load_config(None, ["run.stages=[sft,rrhf]"])


def test_tied_ranked_scores_warn_and_report_null(trained: dict[str, Path], tmp_path: Path) -> None:
    """Issue 14, fault 7: all-tied candidates leave no pair to rank: a warning, and ranking_accuracy null in
    strict JSON (the manifest and `rlhf report --json`), not the bare token NaN."""
    ranked = tmp_path / "tied.jsonl"
    rows = [
        {"query": "3+4=", "responses": ["7", "8"], "scores": [1.0, 1.0]},
        {"query": "12+9=", "responses": ["21", "11", "2"], "scores": [0.0, 0.0, 0.0]},
    ]
    ranked.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = load_config(None, [*FAST, "run.stages=[sft,rrhf]", f"data.ranked={ranked}"])
    execute("rrhf", train_rrhf, cfg, tmp_path / "rrhf", {"sft": trained["sft"]})

    def refuse(token: str) -> None:
        raise AssertionError(f"{token} is not JSON")

    metrics = json.loads((tmp_path / "rrhf" / "manifest.json").read_text(), parse_constant=refuse)["metrics"]
    assert metrics["ranking_accuracy"] is None and metrics["ranking_accuracy_before"] is None
    assert any("rewards are tied: the ranking loss is zero" in w for w in metrics["warnings"])


def test_rrhf_trains_on_the_ids_it_sampled_at_a_high_temperature(trained: dict[str, Path]) -> None:
    """Issue 14, fault 8: at rrhf.temperature=2 decoded-then-re-encoded candidates change ids (cut multi-byte
    characters, special tokens); the log-probs RRHF trains on are those of the sampled ids themselves."""
    from stages.model.adapters import load_adapter
    from stages.model.generation import generate
    from stages.model.reward_model import reward_of
    from stages.model.sequences import from_token_ids, token_logprobs
    from stages.rrhf.recipe import POLICY, group_logprobs, sample_groups
    from stages.training.rewards import reward_source

    cfg = load_config(None, [*FAST, "rrhf.temperature=2.0", "rrhf.num_candidates=4", "rrhf.max_new_tokens=12"])
    backbone = load_backbone(cfg.backbone)
    tokenization = Tokenization.of(backbone.tokenizer)
    model = load_adapter(backbone.model, trained["sft"], POLICY, backbone.fingerprint)
    model, head = attach_reward(model, trained["reward"], tokenization, backbone.fingerprint)
    model.set_adapter(POLICY)
    prompts = ["3+4=", "12+9=", "5+5=", "7+1=", "18+17=", "0+0="]
    source = reward_source(cfg.rrhf, lambda samples: reward_of(model, head, samples, tokenization.pad_id, 0.0))
    groups = sample_groups(model, source, tokenization, prompts, cfg.rrhf, cfg.run.seed + 1)
    from stages.model.adapters import active_adapter

    with active_adapter(model, POLICY):
        samples = generate(
            model,
            tokenization,
            [tokenization.prompt_ids(p) for p in prompts for _ in range(4)],
            max_new_tokens=12,
            temperature=2.0,
            batch_size=64,
            seed=cfg.run.seed + 1,
        )
    assert [ids for g in groups for ids in g.response_ids] == [list(s.token_ids) for s in samples]
    changed = sum(
        tokenization.response_ids(p, s.text, s.finished) != list(s.token_ids)
        for p, s in zip([p for p in prompts for _ in range(4)], samples)
    )
    assert changed > 0, "at T=2 some candidates must re-encode differently, or this test shows nothing"
    with torch.no_grad():
        logprobs, _, _ = group_logprobs(model, tokenization, groups)
        batch = from_token_ids([(list(s.prompt_ids), list(s.token_ids)) for s in samples], tokenization.pad_id, "cpu")
        direct = token_logprobs(model, batch)
    expected = (direct.sum(-1) / batch.response_mask.sum(-1)).reshape(len(prompts), 4)
    torch.testing.assert_close(logprobs, expected, rtol=0, atol=1e-5)


def test_held_out_accuracy_is_measured_on_a_bounded_sample_and_says_how_many(tmp_path: Path) -> None:
    """``reward.eval_max_pairs`` bounds the held-out pairs scored (a 200k-pair file holds out 20k); the metrics
    name the number evaluated and the number held out, so 2 pairs are not mistaken for all of them."""
    cfg = load_config(None, [*FAST, "reward.max_steps=2", "reward.eval_max_pairs=2", "tracking.backend=none"])
    metrics = execute("reward", train_reward, cfg, tmp_path / "reward", {})["metrics"]
    assert metrics["eval_pairs"] == 2 and metrics["held_out_pairs"] > 2
    assert metrics["pair_accuracy"] in {0.0, 0.5, 1.0}  # measured on exactly 2 pairs
