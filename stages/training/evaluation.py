"""How well a policy does the task: sample held-out prompts and apply the task's checker
(``task_score``, the share of exact answers)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from stages.io.arithmetic import check
from stages.io.config import EvalSection
from stages.io.data import Record
from stages.model.generation import Response, generate

if TYPE_CHECKING:
    import torch

    from stages.model.tokenization import Tokenization


def score_responses(responses: list[Response], answers: list[str]) -> float:
    """Share of responses that stopped and whose text equals the reference answer."""
    correct = sum(r.finished and check(r.text, a) for r, a in zip(responses, answers, strict=True))
    return correct / len(answers)


def task_score(
    model: "torch.nn.Module", tokenization: "Tokenization", records: list[Record], cfg: EvalSection,
    seed: int, desc: str = "task_score", synced: bool = False,
) -> float:
    """Sample on the first ``cfg.num_prompts`` held-out prompts (rendered by the tokenization contract,
    with the chat template's generation prompt where it applies) and apply the checker to the text
    before each response's end token."""
    records = records[: cfg.num_prompts]
    responses = generate(
        model, tokenization, [tokenization.prompt_ids(r["prompt"]) for r in records], max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature, batch_size=cfg.batch_size, seed=seed, desc=desc, synced=synced,
    )
    return score_responses(responses, [r["answer"] for r in records])
