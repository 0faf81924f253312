"""Sampling responses from the active adapter: KV cache, left padding, temperature, EOS.

No global state leaks out: the caller's RNG stream is restored after a seeded generation
(``torch.random.fork_rng``), and the tokenizer's own ``padding_side`` is never changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from stages.io.progress import progress

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

    responses: list[Response] = []
    was_training = model.training
    model.eval()
    # HF sampling draws from the global generators: seed a fork of them, so the caller's streams go on as before.
    device = next(model.parameters()).device
    on_cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if on_cuda else []):
        torch.default_generator.manual_seed(seed)  # not torch.manual_seed: that reseeds every GPU, unforked
        if on_cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        try:
            for start in progress(range(0, len(prompts), batch_size), desc=desc, unit="batch", leave=False):
                # Left padding: decoder-only batches must end where generation starts.
                batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True,
                                  padding_side="left")
                with torch.no_grad():
                    out = model.generate(
                        **batch, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_k=0,
                        top_p=1.0, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                        synced_gpus=synced,
                    )
                new_tokens = out[:, batch.input_ids.shape[1] :]
                responses.extend(_decode(batch.input_ids, batch.attention_mask, new_tokens, tokenizer))
        finally:
            model.train(was_training)
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
