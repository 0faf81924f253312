"""Sampling responses and scoring a policy with the task's checker (``task_score`` in [0, 1])."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from stages.config import EvalSection
from stages.data import Record
from stages.task import check

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Response:
    text: str  # decoded response up to (not including) end-of-sequence
    finished: bool  # the policy emitted end-of-sequence within the token budget
    prompt_ids: tuple[int, ...] = ()  # the prompt's tokens, padding removed
    token_ids: tuple[int, ...] = ()  # the response's tokens, EOS included when finished


def generate(
    model: "torch.nn.Module", tokenizer: "PreTrainedTokenizerBase", prompts: list[str], *, max_new_tokens: int,
    temperature: float, batch_size: int, seed: int, desc: str = "generating", synced: bool = False,
) -> list[Response]:
    """Sample one response per prompt (temperature sampling, no top-k/top-p), reproducibly from ``seed``.

    ``synced``: every rank of a ZeRO-3 job runs the same generation, in lockstep (``synced_gpus``).
    """
    import torch
    from tqdm.auto import tqdm

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    tokenizer.padding_side = "left"  # decoder-only batches must end where generation starts
    responses: list[Response] = []
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", leave=False):
            batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True)
            with torch.no_grad():
                out = model.generate(
                    **batch, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_k=0,
                    top_p=1.0, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                    synced_gpus=synced,
                )
            responses.extend(_decode(batch.input_ids, batch.attention_mask, out[:, batch.input_ids.shape[1] :], tokenizer))
    finally:
        model.train(was_training)
        torch.random.set_rng_state(generator_state)
    return responses


def _decode(prompt_ids: "torch.Tensor", prompt_mask: "torch.Tensor", new_tokens: "torch.Tensor",
            tokenizer: "PreTrainedTokenizerBase") -> list[Response]:
    responses = []
    for prompt, keep, row in zip(prompt_ids.tolist(), prompt_mask.tolist(), new_tokens.tolist()):
        finished = tokenizer.eos_token_id in row
        kept = row[: row.index(tokenizer.eos_token_id)] if finished else row
        responses.append(Response(
            text=tokenizer.decode(kept, skip_special_tokens=True), finished=finished,
            prompt_ids=tuple(t for t, k in zip(prompt, keep) if k),
            token_ids=tuple(kept + [tokenizer.eos_token_id] if finished else kept),
        ))
    return responses


def score_responses(responses: list[Response], answers: list[str]) -> float:
    """Share of responses that stopped and whose text equals the reference answer."""
    correct = sum(r.finished and check(r.text, a) for r, a in zip(responses, answers, strict=True))
    return correct / len(answers)


def task_score(
    model: "torch.nn.Module", tokenizer: "PreTrainedTokenizerBase", records: list[Record], cfg: EvalSection,
    seed: int, desc: str = "task_score", synced: bool = False,
) -> float:
    """Sample on the first ``cfg.num_prompts`` held-out prompts and apply the checker."""
    records = records[: cfg.num_prompts]
    responses = generate(
        model, tokenizer, [r["prompt"] for r in records], max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature, batch_size=cfg.batch_size, seed=seed, desc=desc, synced=synced,
    )
    return score_responses(responses, [r["answer"] for r in records])
