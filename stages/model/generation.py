"""Sampling responses from the active adapter: KV cache, left padding, temperature, end tokens.

Prompts come in as token ids from ``stages.model.tokenization.Tokenization`` and responses go out as the
sampled ids (end token included when the response finished), so every stage scores and trains on
exactly the tokens that were sampled, never a re-tokenization of their decoded text.

No global state leaks out: the caller's RNG stream is restored after a seeded generation
(``torch.random.fork_rng``), and the tokenizer's own ``padding_side`` is never changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from stages.io.progress import progress
from stages.model.placement import model_device

if TYPE_CHECKING:
    import torch

    from stages.model.tokenization import Tokenization


@dataclass(frozen=True)
class Response:
    text: str  # decoded response up to (not including) its end token
    finished: bool  # the policy emitted an end token (EOS or the template's end of turn) within the budget
    prompt_ids: tuple[int, ...] = ()  # the prompt's tokens, padding removed
    token_ids: tuple[int, ...] = ()  # the response's tokens, the end token included when finished


def generate(
    model: "torch.nn.Module", tokenization: "Tokenization", prompts: list[list[int]], *, max_new_tokens: int,
    temperature: float, batch_size: int, seed: int, desc: str = "generating", synced: bool = False,
) -> list[Response]:
    """Sample one response per prompt (token ids, ``Tokenization.prompt_ids``) by temperature sampling
    (no top-k/top-p), reproducibly from ``seed``; a response ends at any of ``tokenization.stop_ids``.

    ``synced``: every rank of a ZeRO-3 job runs the same generation, in lockstep (``synced_gpus``).
    """
    import torch

    responses: list[Response] = []
    was_training = model.training
    model.eval()
    # HF sampling draws from the global generators: seed a fork of them, so the caller's streams go on as before.
    device = model_device(model)
    on_cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if on_cuda else []):
        torch.default_generator.manual_seed(seed)  # not torch.manual_seed: that reseeds every GPU, unforked
        if on_cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        try:
            for start in progress(range(0, len(prompts), batch_size), desc=desc, unit="batch", leave=False):
                input_ids, attention_mask = left_padded(prompts[start : start + batch_size], tokenization.pad_id, device)
                with torch.no_grad():
                    out = model.generate(
                        input_ids=input_ids, attention_mask=attention_mask,
                        max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                        pad_token_id=tokenization.pad_id, eos_token_id=list(tokenization.stop_ids), synced_gpus=synced,
                    )
                new_tokens = out[:, input_ids.shape[1] :].cpu()
                responses.extend(_responses(prompts[start : start + batch_size], new_tokens, tokenization))
        finally:
            model.train(was_training)
    return responses


def left_padded(prompts: list[list[int]], pad_id: int, device: "torch.device | str"
                ) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(input_ids, attention_mask) on ``device``, each (B, T): decoder-only batches must end where
    generation starts."""
    import torch

    width = max(len(p) for p in prompts)
    input_ids = [[pad_id] * (width - len(p)) + list(p) for p in prompts]
    attention_mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
    return (torch.tensor(input_ids, dtype=torch.long, device=device),
            torch.tensor(attention_mask, dtype=torch.long, device=device))


def _responses(prompts: list[list[int]], new_tokens: "torch.Tensor", tokenization: "Tokenization") -> list[Response]:
    stops = set(tokenization.stop_ids)
    responses = []
    for prompt, row in zip(prompts, new_tokens.tolist()):
        end = next((i for i, token in enumerate(row) if token in stops), None)
        kept = row if end is None else row[: end + 1]  # the end token is part of the response
        responses.append(Response(text=tokenization.text(kept if end is None else kept[:-1]), finished=end is not None,
                                  prompt_ids=tuple(prompt), token_ids=tuple(kept)))
    return responses
