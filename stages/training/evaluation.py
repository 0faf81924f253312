"""How well a policy does the task: sample held-out prompts and apply the task's checker
(``task_score``, the share of exact answers); for a policy trained against a reference, also how far
it moved from it on those samples (``evaluate_policy``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from stages.io.arithmetic import check
from stages.io.config import EvalSection
from stages.io.data import Record
from stages.model.adapters import active_adapter
from stages.model.generation import generate
from stages.model.placement import model_device
from stages.model.sequences import Response, from_token_ids, token_logprobs

if TYPE_CHECKING:
    from collections.abc import Callable

    from peft import PeftModel

    from stages.io.formats import Prompt
    from stages.model.tokenization import Tokenization


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
    records = records[: cfg.num_prompts]
    return score_responses(
        _samples(model, tokenization, records, cfg, seed, desc, synced), [r["answer"] for r in records]
    )


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
    reward: Callable[[list[Response], list[Prompt]], list[float]] | None = None,
) -> dict[str, float]:
    """``task_score`` of the active adapter (the policy) and, on the same samples, its KL to the adapter
    ``reference``: the Monte-Carlo estimate of KL(policy || reference) per response, the mean over samples
    of the sum over their tokens of log policy - log reference, both at ``cfg.temperature`` (nats).
    With ``reward`` (the stage's reward source), ``policy_reward`` is the mean reward of those samples.

    The policy's log-probs are those generation sampled with; the reference's come from one forward of
    the sampled ids. The same samples, hence the same ``task_score``, as ``task_score`` with this seed.
    """
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
    if reward is not None:
        rewards = reward(responses, [r["prompt"] for r in records])
        found["policy_reward"] = sum(rewards) / len(rewards)
    return found


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
