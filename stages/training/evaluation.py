"""How well a policy does the task: sample held-out prompts and apply the task's checker
(``task_score``, the share of exact answers); for a policy trained against a reference, also how far
it moved from it on those samples (``evaluate_policy``); and what it says, as sample tables
(``final_evaluation``, ``step_samples``: ``stages.io.samples``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from stages.io.arithmetic import check
from stages.io.config import EvalSection
from stages.io.data import Record
from stages.io.samples import Row, sample_rows
from stages.model.adapters import active_adapter
from stages.model.generation import generate
from stages.model.placement import model_device
from stages.model.sequences import Response, from_token_ids, token_logprobs

if TYPE_CHECKING:
    from peft import PeftModel

    from stages.model.tokenization import Tokenization
    from stages.training.rewards import RewardSource


def score_responses(responses: list[Response], answers: list[str]) -> float:
    """Share of responses that stopped and whose text equals the reference answer."""
    correct = sum(r.finished and check(r.text, a) for r, a in zip(responses, answers, strict=True))
    return correct / len(answers)


def task_score(
    model: torch.nn.Module,
    tokenization: Tokenization,
    records: list[Record],
    cfg: EvalSection,
    seed: int,
    desc: str = "task_score",
    synced: bool = False,
) -> float:
    """Sample on the first ``cfg.num_prompts`` held-out prompts (rendered by the tokenization contract,
    with the chat template's generation prompt where it applies) and apply the checker to the text
    before each response's end token."""
    return scored_samples(model, tokenization, records, cfg, seed, phase="final", step=0, desc=desc, synced=synced)[0]


def scored_samples(
    model: torch.nn.Module,
    tokenization: Tokenization,
    records: list[Record],
    cfg: EvalSection,
    seed: int,
    *,
    phase: str,
    step: int,
    desc: str = "task_score",
    synced: bool = False,
) -> tuple[float, list[Row]]:
    """``task_score``, and the sample table of its first ``cfg.samples`` responses (``phase`` after ``step``)."""
    records = records[: cfg.num_prompts]
    responses = _samples(model, tokenization, records, cfg, seed, desc, synced)
    score = score_responses(responses, [r["answer"] for r in records])
    return score, sample_rows(phase, step, records[: cfg.samples], responses)


def evaluate_policy(
    model: PeftModel,
    tokenization: Tokenization,
    records: list[Record],
    cfg: EvalSection,
    seed: int,
    *,
    reference: str,
    desc: str = "task_score",
    synced: bool = False,
    reward: RewardSource | None = None,
) -> dict[str, float]:
    """``task_score`` of the active adapter (the policy) and, on the same samples, its KL to the adapter
    ``reference``: the Monte-Carlo estimate of KL(policy || reference) per response, the mean over samples
    of the sum over their tokens of log policy - log reference, both at ``cfg.temperature`` (nats).
    With ``reward`` (the stage's reward source), ``policy_reward`` is the mean reward of those samples.

    The policy's log-probs are those generation sampled with; the reference's come from one forward of
    the sampled ids. The same samples, hence the same ``task_score``, as ``task_score`` with this seed.
    """
    return _policy_evaluation(model, tokenization, records, cfg, seed, reference, desc, synced, reward).metrics


@dataclass
class _PolicyEvaluation:
    metrics: dict[str, float]
    responses: list[Response]  # one per evaluated record, in order
    rewards: dict[str, list[float]] | None  # RewardSource.parts of the responses


def _policy_evaluation(
    model: PeftModel,
    tokenization: Tokenization,
    records: list[Record],
    cfg: EvalSection,
    seed: int,
    reference: str,
    desc: str,
    synced: bool,
    reward: RewardSource | None,
) -> _PolicyEvaluation:
    records = records[: cfg.num_prompts]
    responses = _samples(model, tokenization, records, cfg, seed, desc, synced)
    kl = []
    with active_adapter(model, reference), torch.no_grad():
        for start in range(0, len(responses), cfg.batch_size):
            chunk = responses[start : start + cfg.batch_size]
            batch = from_token_ids(
                [(list(r.prompt_ids), list(r.token_ids)) for r in chunk], tokenization.pad_id, model_device(model)
            )
            reference_logprobs = token_logprobs(model, batch, cfg.temperature).sum(-1)  # (B,)
            kl += [sum(r.token_logprobs) - ref for r, ref in zip(chunk, reference_logprobs.tolist(), strict=True)]
    found = {
        "task_score": score_responses(responses, [r["answer"] for r in records]),
        "kl_to_reference": sum(kl) / len(kl),
    }
    parts = None
    if reward is not None:
        parts = reward.parts(responses, [r["prompt"] for r in records])
        found["policy_reward"] = sum(parts["reward"]) / len(parts["reward"])
    return _PolicyEvaluation(found, responses, parts)


def final_evaluation(
    model: PeftModel,
    tokenization: Tokenization,
    records: list[Record],
    cfg: EvalSection,
    seed: int,
    *,
    reference: str,
    step: int,
    desc: str = "task_score",
    synced: bool = False,
    reward: RewardSource | None = None,
) -> tuple[dict[str, float], list[Row]]:
    """``evaluate_policy``'s metrics, and the final sample table: the first ``cfg.samples`` of its responses
    with their rewards, beside the ``reference`` adapter's responses to the same prompts from the same
    random streams (one more generation, of ``cfg.samples`` prompts). ``step``: the stage's last step."""
    found = _policy_evaluation(model, tokenization, records, cfg, seed, reference, desc, synced, reward)
    shown = records[: min(cfg.samples, cfg.num_prompts)]
    if not shown:
        return found.metrics, []
    with active_adapter(model, reference):
        references = _samples(model, tokenization, shown, cfg, seed, "reference samples", synced)
    rewards = {name: values[: len(shown)] for name, values in found.rewards.items()} if found.rewards else None
    return found.metrics, sample_rows("final", step, shown, found.responses, rewards, references)


def step_samples(
    model: torch.nn.Module,
    tokenization: Tokenization,
    records: list[Record],
    cfg: EvalSection,
    seed: int,
    *,
    step: int,
    phase: str = "step",
    reward: RewardSource | None = None,
    synced: bool = False,
) -> list[Row]:
    """The sample table of the active adapter after ``step``: its responses to the first ``cfg.samples``
    held-out prompts (the streams of the final evaluation's, so rows of two steps differ by the training
    between them) with their rewards; empty when ``cfg.samples`` is 0."""
    shown = records[: min(cfg.samples, cfg.num_prompts)]
    if not shown:
        return []
    responses = _samples(model, tokenization, shown, cfg, seed, "samples", synced)
    rewards = reward.parts(responses, [r["prompt"] for r in shown]) if reward is not None else None
    return sample_rows(phase, step, shown, responses, rewards)


def _samples(
    model: torch.nn.Module,
    tokenization: Tokenization,
    records: list[Record],
    cfg: EvalSection,
    seed: int,
    desc: str,
    synced: bool,
) -> list[Response]:
    return generate(
        model,
        tokenization,
        [tokenization.prompt_ids(r["prompt"]) for r in records],
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        batch_size=cfg.batch_size,
        seed=seed,
        desc=desc,
        synced=synced,
    )


def held_out_loss(model: torch.nn.Module, tokenization: Tokenization, records: list[Record], cfg: EvalSection) -> float:
    """SFT's loss on held-out data: the mean negative log-likelihood (nats per token) of the reference
    answers of the first ``cfg.num_prompts`` held-out records, end token included, given their prompts
    (the ids ``Tokenization.pair`` gives SFT's own demonstrations)."""
    rows = [tokenization.pair(r["prompt"], r["answer"]) for r in records[: cfg.num_prompts]]
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), cfg.batch_size):
            batch = from_token_ids(rows[start : start + cfg.batch_size], tokenization.pad_id, model_device(model))
            total -= token_logprobs(model, batch).sum().item()  # zero off the responses
            tokens += int(batch.response_mask.sum().item())
    return total / tokens
