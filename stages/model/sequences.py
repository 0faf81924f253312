"""Prompt + response token batches and the two forward passes every RLHF stage needs.

The ids come from the tokenization contract (``stages.model.tokenization``: prompt ids then response
ids, the end token included when a response finished); batches are right-padded. ``response_mask``
marks the response tokens (end token included): the tokens a policy is scored or trained on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from stages.model.prompt_sharing import PromptGroups


@dataclass(frozen=True)
class Response:
    """One sampled response (``stages.model.generation.generate``): its text, ids and sampling log-probs."""

    text: str  # decoded response up to (not including) its end token
    finished: bool  # the policy emitted an end token (EOS or the template's end of turn) within the budget
    prompt_ids: tuple[int, ...] = ()  # the prompt's tokens, padding removed
    token_ids: tuple[int, ...] = ()  # the response's tokens, the end token included when finished
    # log softmax(logits / temperature) of each token in ``token_ids``: the probability it was sampled with
    token_logprobs: tuple[float, ...] = ()


@dataclass
class SequenceBatch:
    input_ids: torch.Tensor  # (B, T) right-padded
    attention_mask: torch.Tensor  # (B, T) 1 on real tokens
    response_mask: torch.Tensor  # (B, T) 1 on response tokens, the end token included

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def from_token_ids(rows: list[tuple[list[int], list[int]]], pad_id: int, device: torch.device | str) -> SequenceBatch:
    """Right-pad (prompt ids, response ids) rows into a batch on ``device`` (the model's: ``model_device``)."""
    width = max(len(p) + len(r) for p, r in rows)
    ids, attention, response = [], [], []
    for prompt, completion in rows:
        pad = width - len(prompt) - len(completion)
        ids.append(prompt + completion + [pad_id] * pad)
        attention.append([1] * (len(prompt) + len(completion)) + [0] * pad)
        response.append([0] * len(prompt) + [1] * len(completion) + [0] * pad)

    def tensor(values: list[list[int]]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    return SequenceBatch(tensor(ids), tensor(attention), tensor(response))


def sampled_batch(
    samples: list[Response], pad_id: int, device: torch.device | str
) -> tuple[SequenceBatch, torch.Tensor]:
    """The batch of sampled (prompt ids, response ids) and the log-probs the tokens were sampled with,
    (B, T) aligned with ``input_ids`` (0 off the response): what an RL stage scores and trains on."""
    batch = from_token_ids([(list(s.prompt_ids), list(s.token_ids)) for s in samples], pad_id, device)
    logprobs = torch.zeros(batch.input_ids.shape, device=device)
    logprobs[batch.response_mask.bool()] = torch.tensor([lp for s in samples for lp in s.token_logprobs], device=device)
    return batch, logprobs


def token_logprobs(model: torch.nn.Module, batch: SequenceBatch, temperature: float = 1.0) -> torch.Tensor:
    """log p(token_t | tokens_<t) at every position, 0 at position 0 and off the response: (B, T). No
    entropy: the (B, T, V) tensors it takes are the largest of a step, and GRPO, RRHF and the reference's
    scoring never read it."""
    return _response_forward(model, batch, temperature, with_hidden=False, with_entropy=False)[0]


def token_logprobs_and_entropy(
    model: torch.nn.Module, batch: SequenceBatch, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the actual tokens and entropies of the predicted distributions: (B, T) each,
    aligned with ``input_ids`` (position t scores token t from the logits at t-1), 0 off the response.

    ``temperature``: the distribution is softmax(logits / T), the one responses sampled at T came from, so
    PPO's ratio and KL penalty compare the distributions that were actually sampled (as TRL's PPO did).

    Only the positions that can predict a response token get logits (``logits_to_keep``), and the
    entropy is computed without gradients: the (B, T, V) tensors are the largest in a PPO step.
    """
    logprobs, entropy, _ = _response_forward(model, batch, temperature, with_hidden=False, with_entropy=True)
    assert entropy is not None
    return logprobs, entropy


def token_logprobs_entropy_and_values(
    model: torch.nn.Module, head: torch.nn.Linear, batch: SequenceBatch, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``token_logprobs_and_entropy`` and ``token_values`` of one adapter from one forward pass, for a value
    head on the policy's own hidden states (``ppo.value_model: shared``): (B, T) each, the same numbers
    as the two separate calls. The values read the hidden states detached: the value loss trains the head
    alone, never the policy adapter (letting it through, as LLaMA-Factory does, took the default chain's
    PPO task_score from the SFT's 0.75 down to 0.28; detached it reached 0.94, separate 0.97)."""
    logprobs, entropy, hidden = _response_forward(model, batch, temperature, with_hidden=True, with_entropy=True)
    assert entropy is not None and hidden is not None
    return logprobs, entropy, _values(head, hidden.detach(), batch)


def _response_forward(
    model: torch.nn.Module, batch: SequenceBatch, temperature: float, with_hidden: bool, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The log-probs of the response tokens (B, T), their entropies (B, T; None without ``with_entropy``) and
    the final hidden states (``with_hidden``).

    The log-prob of token t is ``logit_t - logsumexp(logits)``, the "selective log-softmax" of TRL's
    ``selective_log_softmax``: the same numbers as gathering from ``log_softmax`` (within float rounding, and
    the same gradient, one-hot minus softmax), without keeping a (B, T, V) log-softmax for the backward
    pass; the logits are neither copied (fp32) nor divided at temperature 1."""
    width = batch.input_ids.shape[1]
    groups = None if with_hidden else PromptGroups.of(model, batch.input_ids, batch.attention_mask, batch.response_mask)
    hidden = None
    if groups is not None:  # a prompt shared by several rows is computed once (stages.model.prompt_sharing)
        logits = groups.tail_logits(model)[:, :-1]  # (B, C-1, V): column j predicts response token j
        targets = groups.tail_ids[:, 1:, None]

        def place(values: torch.Tensor) -> torch.Tensor:
            return groups.place(values, width)  # zero off the response (PromptGroups.of checks the layout)

    else:
        first = int(batch.response_mask.float().argmax(dim=1).min()) if batch.response_mask.any() else width - 1
        keep = width - max(first - 1, 0)  # logits at positions first-1 .. T-1
        with _capture_final_hidden(model) if with_hidden else contextlib.nullcontext([]) as captured:
            out = model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                logits_to_keep=keep,
                output_hidden_states=with_hidden and _final_norm(model) is None,
            )
        hidden = (captured[-1] if captured else out.hidden_states[-1]) if with_hidden else None
        logits = out.logits[:, :-1]  # (B, keep-1, V): predicting the last keep-1 tokens
        targets = batch.input_ids[:, width - keep + 1 :, None]

        def place(values: torch.Tensor) -> torch.Tensor:
            return _align(values, batch)

    logits = logits.float()  # no copy in fp32
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():  # logged only
            logprobs = torch.log_softmax(logits, dim=-1)
            entropy = place(-(logprobs.exp() * logprobs).sum(-1))
    return place(picked), entropy, hidden


def token_values(model: torch.nn.Module, head: torch.nn.Linear, batch: SequenceBatch) -> torch.Tensor:
    """Value head on the hidden state that predicts each token (position t uses hidden t-1): (B, T)."""
    return _values(head, final_hidden_states(model, batch), batch)


def _values(head: torch.nn.Linear, hidden: torch.Tensor, batch: SequenceBatch) -> torch.Tensor:
    """(B, T, H) final hidden states -> (B, T) values, position t from hidden t-1, zero off the response."""
    return _align(head(hidden[:, :-1].to(head.weight.dtype)).squeeze(-1), batch)


def final_hidden_states(model: torch.nn.Module, batch: SequenceBatch) -> torch.Tensor:
    """The decoder's final hidden states (after its final norm, what HF returns as ``hidden_states[-1]``):
    (B, T, H). Through the full (PEFT) model forward, so LoRA and prefix adapters both apply.

    Taken from a forward hook on the final norm rather than ``output_hidden_states=True``, which keeps
    every layer's (B, T, H) output alive until the forward returns: L + 1 of them, e.g. 8 GB for a 7B
    Llama scoring 64 x 512 tokens in bf16. Architectures without a ``norm`` on their decoder fall back
    to ``output_hidden_states``. Both give the same tensor (``tests/test_sequences.py``).
    """
    with _capture_final_hidden(model) as captured:
        out = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            logits_to_keep=1,
            output_hidden_states=_final_norm(model) is None,
        )
    return captured[-1] if captured else out.hidden_states[-1]


@contextlib.contextmanager
def _capture_final_hidden(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """A list that receives the final norm's output during forwards inside the block (stays empty for an
    architecture without a final norm: the caller then asks for ``output_hidden_states``)."""
    captured: list[torch.Tensor] = []
    norm = _final_norm(model)
    handle = norm.register_forward_hook(lambda module, inputs, output: captured.append(output)) if norm else None
    try:
        yield captured
    finally:
        if handle is not None:
            handle.remove()


def _final_norm(model: torch.nn.Module) -> torch.nn.Module | None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    return getattr(decoder, "norm", None)


def _align(shifted: torch.Tensor, batch: SequenceBatch) -> torch.Tensor:
    """(B, k) values for the last k tokens -> (B, T) aligned with input positions, zero off the response."""
    pad = batch.input_ids.shape[1] - shifted.shape[1]
    aligned = torch.cat([torch.zeros_like(shifted[:, :1]).expand(-1, pad), shifted], dim=1)
    return aligned * batch.response_mask


def last_hidden_states(model: torch.nn.Module, batch: SequenceBatch) -> torch.Tensor:
    """Final-layer hidden state (after the final norm) at each row's last real token: (B, H).

    Goes through the full (PEFT) model forward, so LoRA and prefix adapters both apply.
    """
    hidden = final_hidden_states(model, batch)  # (B, T, H)
    last = batch.attention_mask.sum(dim=1) - 1  # (B,) right padding: the last real token
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
