"""Sampling responses from the active adapter: KV cache, left padding, temperature, end tokens.

Prompts come in as token ids from ``stages.model.tokenization.Tokenization`` and responses go out as the
sampled ids (end token included when the response finished), so every stage scores and trains on
exactly the tokens that were sampled, never a re-tokenization of their decoded text.

Each response is sampled from a random stream of its own, keyed by ``(seed, key)`` (Gumbel-max,
``GumbelSampler``): what a prompt samples does not depend on which other prompts share its batch, its
rank or its process. A local run and a DeepSpeed run that hand the same prompt the same key sample the
same tokens (up to float noise in the logits, which flips a draw with probability ~1e-6 per token),
where one stream per batch made them differ at every near-tie. Nothing global is drawn from or reseeded,
and the tokenizer's own ``padding_side`` is never changed.

The model's own ``generation_config`` (Qwen2.5-Instruct's ``repetition_penalty: 1.05``, ``top_k: 20``,
``temperature: 0.7``) does not apply: a stage samples from softmax(logits / its temperature), exactly the
distribution whose log-probs it trains on (issue 28, fault 2: penalised samples were up to 0.64 nats off
the training forward). ``stages.model.backbone.ignored_generation_settings`` names what is ignored (``load_backbone`` prints
it); its end ids do apply (``Tokenization.stop_ids``), and ``rlhf export`` keeps the rest for serving.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from transformers import GenerationConfig

from stages.io.progress import progress
from stages.model.placement import model_device
from stages.model.prompt_sharing import shared_prompt_cache
from stages.model.sequences import Response

if TYPE_CHECKING:
    from stages.model.tokenization import Tokenization


def generate(
    model: torch.nn.Module,
    tokenization: Tokenization,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    batch_size: int,
    seed: int,
    keys: Sequence[int] | None = None,
    desc: str = "generating",
    synced: bool = False,
) -> list[Response]:
    """Sample one response per prompt (token ids, ``Tokenization.prompt_ids``) by temperature sampling
    (no top-k/top-p); a response ends at any of ``tokenization.stop_ids``.

    ``keys`` (one int per prompt, default its position): prompt i draws from the stream of
    ``(seed, keys[i])``, so the same (seed, key, prompt ids) sample the same response in any batch; a
    caller that shards prompts over ranks passes their global positions. Two prompts that must sample
    independently (a group's G samples) need different keys.

    Each response carries the log-probability of every sampled token under softmax(logits / temperature),
    so PPO need not run the policy again to score what it sampled (TRL's PPO did the same).

    ``synced``: every rank of a ZeRO-3 job runs the same generation, in lockstep (``synced_gpus``).
    Raises ``ValueError`` when ``keys`` and ``prompts`` differ in length.
    """
    keys = list(range(len(prompts))) if keys is None else list(keys)
    if len(keys) != len(prompts):
        raise ValueError(f"generate: {len(keys)} keys for {len(prompts)} prompts")
    responses: list[Response] = []
    was_training = model.training
    model.eval()
    device = model_device(model)
    try:
        for start in progress(range(0, len(prompts), batch_size), desc=desc, unit="batch", leave=False):
            chunk = prompts[start : start + batch_size]
            input_ids, attention_mask = left_padded(chunk, tokenization.pad_id, device)
            sampler = GumbelSampler(temperature, seed, keys[start : start + batch_size], device)
            with torch.no_grad(), _model_defaults_off(model):
                cache = None if synced else shared_prompt_cache(model, input_ids, attention_mask)
                out = model.generate(  # greedy over ``sampler``'s perturbed scores = sampling at ``temperature``
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    past_key_values=cache,
                    logits_processor=[sampler],
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    temperature=1.0,
                    pad_token_id=tokenization.pad_id,
                    eos_token_id=list(tokenization.stop_ids),
                    synced_gpus=synced,
                )
            del cache  # the chunk's whole KV cache: not alive beside the next chunk's
            new_tokens = out[:, input_ids.shape[1] :]
            logprobs = sampler.of(new_tokens).cpu()
            responses.extend(_responses(chunk, new_tokens.cpu(), logprobs, tokenization))
    finally:
        model.train(was_training)
    return responses


@contextmanager
def _model_defaults_off(model: torch.nn.Module) -> Iterator[None]:
    """Within it, every transformers model inside ``model`` (a PEFT wrapper, a DeepSpeed engine) has a
    blank ``generation_config``: transformers fills what ``generate`` is not passed from the model's own
    config, so its repetition penalty or ``min_new_tokens`` would otherwise run before ``GumbelSampler``."""
    holders = [m for m in model.modules() if isinstance(m.__dict__.get("generation_config"), GenerationConfig)]
    saved = [m.generation_config for m in holders]
    try:
        for holder in holders:
            holder.generation_config = GenerationConfig()
        yield
    finally:
        for holder, config in zip(holders, saved):
            holder.generation_config = config


def left_padded(prompts: list[list[int]], pad_id: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) on ``device``, each (B, T): decoder-only batches must end where
    generation starts."""
    width = max(len(p) for p in prompts)
    input_ids = [[pad_id] * (width - len(p)) + list(p) for p in prompts]
    attention_mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
    return (
        torch.tensor(input_ids, dtype=torch.long, device=device),
        torch.tensor(attention_mask, dtype=torch.long, device=device),
    )


def row_seed(seed: int, key: int) -> int:
    """The seed of one response's random stream: a 63-bit digest of ``(seed, key)``, so neighbouring
    seeds and keys (update n, prompt k+1) get unrelated streams."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class GumbelSampler:
    """A logits processor that samples at ``temperature`` by the Gumbel-max trick: ``generate`` runs
    greedy over log softmax(logits / T) + G, with G ~ Gumbel(0, 1) drawn for each row from its own
    generator (``row_seed``), and argmax(log p + G) is a draw from p (Gumbel 1954; Maddison et al. 2014,
    "A* Sampling"). Row r's t-th draw depends only on (seed, key_r, t): batch-invariant.

    It keeps the log-probability of each token sampled: the token drawn from step t's distribution is
    only known at step t+1 (or after ``generate`` returns), so one step's log-softmax (B, V) is held
    until then: memory O(B x V), not O(B x new tokens x V) as ``output_logits`` would hold.

    It must see the logits the training forward computes: ``generate`` runs greedy, so HF adds no
    temperature, top-k or top-p warper, and the model's ``generation_config`` is blanked while it runs,
    so no processor it asks for (a ``repetition_penalty``, ``min_new_tokens``) runs before this one.
    """

    def __init__(self, temperature: float, seed: int, keys: Sequence[int], device: torch.device | str) -> None:
        self.temperature = temperature
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(row_seed(seed, key)) for key in keys]
        self.pending: torch.Tensor | None = None  # (B, V) log-softmax of the step not yet sampled from
        self.steps: list[torch.Tensor] = []  # (B,) per completed step

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._take(input_ids[:, -1])
        self.pending = torch.log_softmax(scores.float() / self.temperature, dim=-1)  # (B, V)
        vocab = scores.shape[-1]
        uniform = torch.stack([torch.rand(vocab, generator=g, device=self.device) for g in self.generators])  # (B, V)
        return self.pending - torch.log(-torch.log(uniform))  # + Gumbel(0, 1); u = 0 gives -inf, never picked

    def _take(self, sampled: torch.Tensor) -> None:
        if self.pending is not None:
            self.steps.append(self.pending.gather(1, sampled[:, None]).squeeze(1))
            self.pending = None

    def of(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """(B, N) log-probs of the ``new_tokens`` (B, N) that ``generate`` returned (after a row ended, the
        values belong to padding and are dropped with it)."""
        self._take(new_tokens[:, len(self.steps)])
        return torch.stack(self.steps, dim=1)


def _responses(
    prompts: list[list[int]], new_tokens: torch.Tensor, logprobs: torch.Tensor, tokenization: Tokenization
) -> list[Response]:
    stops = set(tokenization.stop_ids)
    responses = []
    for prompt, row, row_logprobs in zip(prompts, new_tokens.tolist(), logprobs.tolist()):
        end = next((i for i, token in enumerate(row) if token in stops), None)
        kept = row if end is None else row[: end + 1]  # the end token is part of the response
        responses.append(
            Response(
                text=tokenization.text(kept if end is None else kept[:-1]),
                finished=end is not None,
                prompt_ids=tuple(prompt),
                token_ids=tuple(kept),
                token_logprobs=tuple(row_logprobs[: len(kept)]),
            )
        )
    return responses
