"""The log-prob gap: how far the log-probability each token was sampled with is from the one the training
forward gives it, before any update.

An RL stage trains on log-probs it recomputes, and PPO's ratio and GRPO's old log-probs assume those are
the probabilities the tokens were sampled with. Anything that samples from another distribution (a
model's ``generation_config`` penalising repeats, a top-k the loss never sees, a different adapter, a
cache bug) shows up here as a gap far above float noise, on the first update (issue 28, fault 2: 0.64
nats at most, 1.025 mean ratio). vLLM-based trainers watch the same quantity (TRL's
``vllm_importance_sampling``); nothing watched it on the ``generate`` path.

Float noise between a KV-cached sampling step and the padded training forward of the same tokens,
measured on the built-in backbones (64 prompts x 16 tokens, temperatures 1.0 and 0.7; largest / mean per
token): fp32 5.3e-6 / 1.9e-7 nats, bf16 0.086 / 1.3e-3; the six tokenizer families of
``tests/test_family_contract.py`` stay under both. A sampling mismatch is orders above: Qwen2.5-Instruct's
repetition penalty 4.0 nats largest on a peaked random model, sampling at 0.5 but training at 1.0 over 1.
A penalty moves few tokens a lot (Qwen's: 4.0 nats largest but 0.005 on average, within bf16's mean
noise), a temperature or adapter mismatch moves all of them: the warning fires on either figure over
``GAP_LIMITS``, 200x (fp32) and 11x (bf16) the largest noise measured, 50x and 8x its mean. The limits
come from small CPU models; noise grows with depth, so a bf16 warning on a large model says to look at
the history's two curves, not that the run is wrong. fp16 takes bf16's limits (more mantissa bits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from stages.model.placement import model_device
from stages.model.sequences import sampled_batch, token_logprobs

if TYPE_CHECKING:
    from stages.model.sequences import Response
    from stages.training.distributed import Distributed


@dataclass(frozen=True)
class GapLimit:
    """The |sampled - trained| log-prob (nats) that float noise explains: the largest per token, and on
    average per token."""

    largest: float
    mean: float


GAP_LIMITS = {"float32": GapLimit(1e-3, 1e-5), "bfloat16": GapLimit(1.0, 0.01), "float16": GapLimit(1.0, 0.01)}


@dataclass
class LogprobGap:
    """The gap over one update's pre-update training forwards: ``add`` each, then ``row``."""

    largest: float = 0.0
    total: float = 0.0
    tokens: int = 0

    def add(self, sampled: torch.Tensor, trained: torch.Tensor, mask: torch.Tensor) -> None:
        """``sampled``, ``trained`` (B, T): log-probs of the same tokens at sampling time and in a training
        forward of the same weights; ``mask`` (B, T): 1 on response tokens."""
        gap = (sampled.detach().float() - trained.detach().float()).abs() * mask
        self.largest = max(self.largest, gap.max().item() if gap.numel() else 0.0)
        self.total += gap.sum().item()
        self.tokens += int(mask.sum().item())

    def add_scored(self, model: torch.nn.Module, samples: list[Response], pad_id: int, temperature: float) -> None:
        """Score ``samples`` (``generate``'s, with their sampling log-probs) with ``model`` as it is now, in
        eval mode and without gradients, at the temperature they were sampled at, and add the gap: for a
        stage that samples once and trains on other forwards (RRHF)."""
        batch, sampled = sampled_batch(samples, pad_id, model_device(model))
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                self.add(sampled, token_logprobs(model, batch, temperature), batch.response_mask)
        finally:
            model.train(was_training)

    def row(self, dist: Distributed) -> dict[str, float]:
        """``logprob_gap_max`` (over every rank's tokens) and ``logprob_gap_mean`` (per token), in nats."""
        ranks = dist.gather([(self.largest, self.total, self.tokens)])  # one collective per update
        largest, total, tokens = max(r[0] for r in ranks), sum(r[1] for r in ranks), sum(r[2] for r in ranks)
        return {"logprob_gap_max": largest, "logprob_gap_mean": total / max(tokens, 1)}


def gap_warning(history: list[dict[str, float]], dtype: str, stage: str) -> str | None:
    """A warning when an update's gap, largest or mean, exceeds float noise for ``dtype``; None otherwise."""
    limit = GAP_LIMITS[dtype]
    over = [
        row
        for row in history
        if row.get("logprob_gap_max", 0.0) > limit.largest or row.get("logprob_gap_mean", 0.0) > limit.mean
    ]
    if not over:
        return None
    worst = max(over, key=lambda row: row["logprob_gap_max"])
    return (
        f"{stage}: the log-probs tokens were sampled with differ from the training forward's by up to "
        f"{worst['logprob_gap_max']:.3g} nats, {worst['logprob_gap_mean']:.3g} on average ({len(over)} of "
        f"{len(history)} updates over {dtype}'s float noise, {limit.largest:g} largest or {limit.mean:g} on average): "
        "the stage trains on a distribution it did not sample from; check the model's generation settings and "
        "`rlhf inspect`"
    )
