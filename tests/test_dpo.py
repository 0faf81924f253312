"""DPO on one backbone: TRL's DPOTrainer trains the policy adapter against a frozen copy of the SFT adapter
on the same base weights, for every adapter kind and both losses. (Kill and resume: tests/test_resume.py;
ZeRO-2: tests/test_deepspeed.py; the quality bar: tests/test_quality.py.)"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stages.dpo.pairs import tokenized_pairs
from stages.dpo.recipe import POLICY, REFERENCE, build_dpo_trainer, train_dpo
from stages.io import artifacts
from stages.io.config import load_config
from stages.io.data import load_records, split_by_prompt
from stages.io.sections import needs_4bit
from stages.model.adapters import load_adapter
from stages.model.backbone import load_backbone, weights_digest
from stages.model.tokenization import Tokenization
from stages.sft.recipe import train_sft
from stages.training.distributed import LOCAL
from stages.training.evaluation import evaluate_policy, task_score
from stages.training.runner import execute
from tests.conftest import TINY, base_elements

FAST = [
    *TINY,
    "tracking.backend=none",
    "dpo.max_steps=3",
    "dpo.batch_size=4",
    "dpo.logging_steps=1",
    "dpo.checkpoint_every=3",
]


def _sft(kind: str, root: Path) -> Path:
    execute("sft", train_sft, load_config(None, [*FAST, f"adapter.kind={kind}"]), root / "sft", {})
    return root / "sft"


def _adapter(model: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    return {n.replace(f".{name}.", "."): p.detach().clone() for n, p in model.named_parameters() if f".{name}." in n}


@pytest.mark.parametrize("kind", ["lora", "qlora", "ptuning_v2"])
def test_dpo_trains_the_policy_against_a_frozen_sft_copy_on_one_backbone(kind: str, tmp_path: Path) -> None:
    sft = _sft(kind, tmp_path)
    cfg = load_config(None, [*FAST, f"adapter.kind={kind}", "dpo.learning_rate=0.01"])
    backbone = load_backbone(cfg.backbone, quantize_4bit=needs_4bit(kind))
    digest = weights_digest(backbone.model)
    tokenization = Tokenization.of(backbone.tokenizer)
    train, held = split_by_prompt(load_records(cfg.data.preferences, "preferences", cfg.task), 0.1, "builtin")
    model = load_adapter(backbone.model, sft, POLICY, backbone.fingerprint, trainable=True)
    sft_weights = _adapter(model, POLICY)

    rows = (tokenized_pairs(train, tokenization), tokenized_pairs(held, tokenization))
    trainer = build_dpo_trainer(model, tokenization, *rows, cfg, tmp_path / "checkpoints", LOCAL)
    assert set(model.peft_config) == {POLICY, REFERENCE}
    assert not any(p.requires_grad for n, p in model.named_parameters() if f".{REFERENCE}." in n)
    trainer.train()
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for n, p in model.named_parameters() if f".{POLICY}." in n}  # the policy only

    policy, reference = _adapter(model, POLICY), _adapter(model, REFERENCE)
    assert policy.keys() == reference.keys() == sft_weights.keys() and policy
    assert all(torch.equal(reference[n], sft_weights[n]) for n in sft_weights)  # the reference never moved
    assert any(not torch.equal(policy[n], sft_weights[n]) for n in sft_weights)  # the policy did
    assert weights_digest(backbone.model) == digest  # the base did not
    # One copy of the base: the unique storages behind the base weights hold exactly one backbone.
    assert base_elements(model) == base_elements(load_backbone(cfg.backbone, quantize_4bit=needs_4bit(kind)).model)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_the_dpo_stage_publishes_its_adapter_and_metrics(loss_type: str, tmp_path: Path) -> None:
    sft = _sft("lora", tmp_path)
    cfg = load_config(None, [*FAST, f"dpo.loss_type={loss_type}"])
    metrics = execute("dpo", train_dpo, cfg, tmp_path / "dpo", {"sft": sft})["metrics"]
    # Step 1 trains with the policy equal to its reference: log-ratio 0, so the sigmoid loss is ln 2 and
    # IPO's is (1 / (2 beta))^2. Without the reference in the loss these would be something else.
    first = json.loads((tmp_path / "dpo" / "history.json").read_text())[0]
    assert first["step"] == 1 and first["loss"] == pytest.approx(
        math.log(2) if loss_type == "sigmoid" else (1 / (2 * cfg.dpo.beta)) ** 2, rel=1e-5
    )
    assert metrics["task_score_sft"] == artifacts.read_manifest(sft)["metrics"]["task_score"]
    assert 0.0 <= metrics["task_score"] <= 1.0 and 0.0 <= metrics["reward_accuracy"] <= 1.0
    assert metrics["kl_to_reference"] > -0.05  # a Monte-Carlo estimate of a KL: near 0 or above
    assert metrics["eval_pairs"] > 0 and metrics["train_pairs"] > metrics["eval_pairs"]
    assert (tmp_path / "dpo" / "adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "dpo" / "adapter" / REFERENCE).exists()  # only the policy is published


def test_a_policy_equal_to_its_reference_is_zero_kl_from_it(tmp_path: Path) -> None:
    """evaluate_policy's KL: the sampled log-probs against a forward of the same ids through the reference;
    with the same weights under both names it is 0 up to float noise, and task_score is task_score's."""
    sft = _sft("lora", tmp_path)
    cfg = load_config(None, [*FAST, "eval.temperature=0.7"])
    backbone = load_backbone(cfg.backbone)
    tokenization = Tokenization.of(backbone.tokenizer)
    held_out = load_records(cfg.data.eval, "eval", cfg.task)
    model = load_adapter(backbone.model, sft, "twin", backbone.fingerprint)
    model = load_adapter(model, sft, POLICY, backbone.fingerprint)
    model.set_adapter(POLICY)
    found = evaluate_policy(model, tokenization, held_out, cfg.eval, seed=3, reference="twin")
    assert abs(found["kl_to_reference"]) < 1e-4, found
    assert found["task_score"] == task_score(model, tokenization, held_out, cfg.eval, seed=3)


def _padded_prompt(tokenization: Tokenization, room: int, context: int) -> str:
    """'000...0;3+4=' (one id per digit) whose ids leave exactly ``room`` ids of the context for the response."""
    for count in range(context):
        prompt = "0" * count + ";3+4="
        if len(tokenization.prompt_ids(prompt)) >= context - room:
            assert len(tokenization.prompt_ids(prompt)) == context - room, "no prompt of that length"
            return prompt
    raise AssertionError("unreachable")


def test_pairs_that_truncation_makes_identical_are_dropped_and_counted(tmp_path: Path) -> None:
    """Issue 29, fault 6: the stage replaces TRL's dataset preparation, and with it TRL's filter of pairs
    whose prompt fills the context; such a pair (and one whose responses agree within it) trained at loss
    ln 2 with no gradient and counted as a wrong pair. Now they are dropped, counted and named."""
    sft = _sft("lora", tmp_path)
    cfg = load_config(None, FAST)
    tokenization = Tokenization.of(load_backbone(cfg.backbone).tokenizer)
    context = 128  # the built-in backbone's max_position_embeddings
    pairs = load_records("builtin", "preferences", cfg.task)
    long = [
        {"prompt": _padded_prompt(tokenization, room, context), "chosen": "7", "rejected": "7;1+1=2"}
        for room in (0, 1, 2)
    ]  # no room; room for "7" alone (the same in both); room to differ
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in [*pairs, *long]))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.training.entry",
            "dpo",
            "--out",
            str(tmp_path / "dpo"),
            "--input",
            f"sft={sft}",
            *(a for s in [*FAST, f"data.preferences={data}", "dpo.eval_max_pairs=2"] for a in ("--set", s)),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    n = len(pairs)
    assert (
        f"{data}: dropped 2 of {n + 3} pairs (records {n + 1}, {n + 2}): chosen and rejected are the same in "
        f"their first {context} tokens"
    ) in result.stdout
    metrics = artifacts.read_manifest(tmp_path / "dpo")["metrics"]
    assert metrics["dropped_pairs"] == 2 and metrics["train_pairs"] + metrics["held_out_pairs"] == n + 1
    # dpo.eval_max_pairs bounds the held-out pairs reward_accuracy is measured on, and the metrics say so
    assert metrics["eval_pairs"] == 2 < metrics["held_out_pairs"] and metrics["reward_accuracy"] in {0.0, 0.5, 1.0}


def test_the_pre_flight_counts_the_pairs_truncation_makes_identical(tmp_path: Path) -> None:
    """``rlhf plan`` and pre-flight count, with the exact ids, the pairs DPO will drop (issue 29): here 3
    of 10 pairs whose chosen and rejected differ only after the backbone's 128-token context."""
    from stages.tools.contract_check import budget_counts, contract_tokenization

    long = "1+" * 70
    rows = [{"prompt": f"{a}+{a}=", "chosen": str(2 * a), "rejected": str(2 * a + 1)} for a in range(7)]
    rows += [{"prompt": "0=", "chosen": long + "1", "rejected": long + "2"} for _ in range(3)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = load_config(None, [*TINY, "run.stages=[sft,dpo]", f"data.preferences={data}"])
    tokenization, context = contract_tokenization(cfg)
    [dpo] = [count for count in budget_counts(cfg, tokenization, context) if count.stage == "dpo"]
    assert (dpo.rows, dpo.cut, dpo.dropped, dpo.estimated) == (10, 3, 3, False)
    assert dpo.line() == (
        f"dpo: {data} (preferences): 3 of 10 rows over the backbone's context=128 (cut at the context), 3 dropped"
    )
