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
    # log softmax(logits / temperature) of each token in ``token_ids``: the probability it was sampled with
    token_logprobs: tuple[float, ...] = ()


def generate(
    model: "torch.nn.Module", tokenization: "Tokenization", prompts: list[list[int]], *, max_new_tokens: int,
    temperature: float, batch_size: int, seed: int, desc: str = "generating", synced: bool = False,
) -> list[Response]:
    """Sample one response per prompt (token ids, ``Tokenization.prompt_ids``) by temperature sampling
    (no top-k/top-p), reproducibly from ``seed``; a response ends at any of ``tokenization.stop_ids``.
    Each response carries the log-probability of every sampled token under softmax(logits / temperature),
    so PPO need not run the policy again to score what it sampled (TRL's PPO did the same).

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
                scaled = SampledLogProbs(temperature)
                with torch.no_grad():
                    out = model.generate(  # temperature 1: ``scaled`` divides the logits, as HF's warper would
                        input_ids=input_ids, attention_mask=attention_mask, logits_processor=[scaled],
                        max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                        pad_token_id=tokenization.pad_id, eos_token_id=list(tokenization.stop_ids), synced_gpus=synced,
                    )
                new_tokens = out[:, input_ids.shape[1] :]
                logprobs = scaled.of(new_tokens).cpu()
                responses.extend(_responses(prompts[start : start + batch_size], new_tokens.cpu(), logprobs, tokenization))
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


class SampledLogProbs:
    """A logits processor that samples at ``temperature`` (it returns logits / T, as HF's temperature
    warper does) and keeps the log-probability of each token then sampled. The token drawn from step t's
    distribution is only known at step t+1 (or after ``generate`` returns), so one step's log-softmax
    (B, V) is held until then: memory O(B x V), not O(B x new tokens x V) as ``output_logits`` would hold.

    It must see the raw logits: ``generate`` is called with temperature 1, no top-k/top-p and no
    repetition settings, so HF adds no processor before it (custom processors run after the defaults).
    """

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature
        self.pending: "torch.Tensor | None" = None  # (B, V) log-softmax of the step not yet sampled from
        self.steps: list["torch.Tensor"] = []  # (B,) per completed step

    def __call__(self, input_ids: "torch.Tensor", scores: "torch.Tensor") -> "torch.Tensor":
        import torch

        self._take(input_ids[:, -1])
        scaled = scores / self.temperature
        self.pending = torch.log_softmax(scaled.float(), dim=-1)
        return scaled

    def _take(self, sampled: "torch.Tensor") -> None:
        if self.pending is not None:
            self.steps.append(self.pending.gather(1, sampled[:, None]).squeeze(1))
            self.pending = None

    def of(self, new_tokens: "torch.Tensor") -> "torch.Tensor":
        """(B, N) log-probs of the ``new_tokens`` (B, N) that ``generate`` returned (after a row ended, the
        values belong to padding and are dropped with it)."""
        import torch

        self._take(new_tokens[:, len(self.steps)])
        return torch.stack(self.steps, dim=1)


def _responses(prompts: list[list[int]], new_tokens: "torch.Tensor", logprobs: "torch.Tensor",
               tokenization: "Tokenization") -> list[Response]:
    stops = set(tokenization.stop_ids)
    responses = []
    for prompt, row, row_logprobs in zip(prompts, new_tokens.tolist(), logprobs.tolist()):
        end = next((i for i, token in enumerate(row) if token in stops), None)
        kept = row if end is None else row[: end + 1]  # the end token is part of the response
        responses.append(Response(text=tokenization.text(kept if end is None else kept[:-1]), finished=end is not None,
                                  prompt_ids=tuple(prompt), token_ids=tuple(kept),
                                  token_logprobs=tuple(row_logprobs[: len(kept)])))
    return responses
