"""One forward pass per distinct prompt: GRPO samples G responses to each prompt and RRHF several
candidates, so a batch repeats every prompt G times. Its tokens are computed once, as a KV cache copied to
each of its rows, and generation (``shared_prompt_cache``) and scoring (``PromptGroups``) continue from
there: at 4 prompts x G=8 of 17 prompt tokens and 32 response tokens, 29% of the tokens of a step.

The numbers are those of one forward over each whole row, within float rounding: the prompt's keys and
values sit at the same positions (``attention_mask.cumsum - 1``, as transformers' ``generate`` computes
them; a right-padded row's own 0..T-1), and the gradient of a trained adapter flows through the cache
into the one prompt pass, summed over the rows that share it (``tests/test_sequences.py``).

Nothing is shared where the active adapter keeps a cache of its own (prompt learning: P-tuning v2's
prefix is its past key values), where gradient checkpointing is on (transformers drops the cache in
training then), where a dropout is active (G passes draw G masks, one pass would draw one), where every
prompt is distinct, or (scoring) where a row is not its prompt, then its response, then padding, has no
response or a one-token prompt. RoPE variants that rescale by the longest position in a pass (dynamic
NTK, LongRoPE) see the prompt and the tail as two passes, as in transformers' own ``generate``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Cache


def shared_prompt_cache(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Cache | None:
    """For ``generate``: the KV cache of every prompt token but the last, computed once per distinct prompt of
    the batch and copied to each of its rows; None when there is nothing to share. ``generate`` continues
    from it with the last prompt token, whose logits its first step needs.

    ``input_ids``, ``attention_mask``: (B, T) left-padded prompts.
    """
    if input_ids.shape[1] < 2 or not _can_share(model):
        return None
    # ids and mask together: a pad id that is also a real token must not merge two different prompts
    distinct, rows = torch.unique(torch.cat([input_ids, attention_mask], dim=1), dim=0, return_inverse=True)
    if len(distinct) == len(input_ids):
        return None
    width = input_ids.shape[1]
    return _prefill(model, distinct[:, : width - 1], distinct[:, width : 2 * width - 1], rows)


@dataclass(frozen=True)
class PromptGroups:
    """A right-padded (prompt + response) batch of B rows as D < B distinct prompts and B tails.

    Each prompt but its last token is one row of ``prefix_ids`` (D, P), left-padded; each row's tail is its
    last prompt token then its response, right-padded in ``tail_ids`` (B, C), C = 1 + the longest
    response. The tail's logits at column j predict the response's token j, which sits at column
    ``starts + j`` of the batch (``place``).
    """

    prefix_ids: torch.Tensor  # (D, P)
    prefix_mask: torch.Tensor  # (D, P)
    rows: torch.Tensor  # (B,) each row's distinct prompt
    tail_ids: torch.Tensor  # (B, C)
    tail_mask: torch.Tensor  # (B, C)
    starts: torch.Tensor  # (B,) the batch column of each row's first response token: its prompt's length

    @staticmethod
    def of(
        model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor
    ) -> PromptGroups | None:
        """The groups of a batch (each (B, T): ids, attention, response; a row is its prompt, then its
        response, then padding), or None when sharing saves nothing or cannot apply (module docstring)."""
        if not _can_share(model):
            return None
        lengths = attention_mask.sum(1)  # (B,)
        responses = response_mask.sum(1)
        starts = lengths - responses
        columns = torch.arange(input_ids.shape[1], device=input_ids.device)
        laid_out = bool(
            (attention_mask.bool() == (columns < lengths[:, None])).all()
            and (response_mask.bool() == ((columns >= starts[:, None]) & (columns < lengths[:, None]))).all()
        )  # each row: its prompt, its response, then padding
        if not laid_out or bool((responses == 0).any() or (starts < 2).any()):
            return None
        prompts = [tuple(row[:start]) for row, start in zip(input_ids.tolist(), starts.tolist(), strict=True)]
        distinct = list(dict.fromkeys(prompts))
        if len(distinct) == len(prompts):
            return None
        index = {prompt: i for i, prompt in enumerate(distinct)}
        device = input_ids.device
        rows = torch.tensor([index[p] for p in prompts], device=device)
        width = max(len(p) for p in distinct) - 1
        prefix = [[0] * (width - len(p) + 1) + list(p[:-1]) for p in distinct]
        prefix_mask = [[0] * (width - len(p) + 1) + [1] * (len(p) - 1) for p in distinct]
        tails = [
            [p[-1], *row[s : s + r]]
            for p, row, s, r in zip(prompts, input_ids.tolist(), starts.tolist(), responses.tolist(), strict=True)
        ]
        tail_width = max(len(t) for t in tails)
        return PromptGroups(
            prefix_ids=torch.tensor(prefix, device=device),
            prefix_mask=torch.tensor(prefix_mask, device=device),
            rows=rows,
            tail_ids=torch.tensor([t + [0] * (tail_width - len(t)) for t in tails], device=device),
            tail_mask=torch.tensor([[1] * len(t) + [0] * (tail_width - len(t)) for t in tails], device=device),
            starts=starts,
        )

    def tail_logits(self, model: torch.nn.Module) -> torch.Tensor:
        """(B, C, V) logits of each row's tail, its prompt read from one shared pass: those of a forward over
        the whole row at columns ``starts - 1 ..``, within float rounding."""
        cache = _prefill(model, self.prefix_ids, self.prefix_mask, self.rows)
        columns = torch.arange(self.tail_ids.shape[1], device=self.tail_ids.device)
        out = model(
            input_ids=self.tail_ids,
            attention_mask=torch.cat([self.prefix_mask[self.rows], self.tail_mask], dim=1),
            # the last prompt token sits at its prompt length - 1; padding at 0, never past the batch's width
            position_ids=(self.starts[:, None] - 1 + columns).masked_fill(self.tail_mask == 0, 0),
            past_key_values=cache,
            use_cache=True,
        )
        return out.logits

    def place(self, values: torch.Tensor, width: int) -> torch.Tensor:
        """(B, C-1) per-response-token values (column j: response token j) -> (B, width) aligned with the
        batch's columns, zero off the response. Differentiable in ``values``."""
        columns = self.starts[:, None] + torch.arange(values.shape[1], device=values.device)  # (B, C-1)
        valid = self.tail_mask[:, 1:].bool()
        placed = torch.zeros(values.shape[0], width, dtype=values.dtype, device=values.device)
        # past a response's end the columns may run off the batch: clamped, and they add 0 there
        return placed.scatter_add(1, columns.clamp(max=width - 1), values.masked_fill(~valid, 0.0))


def _prefill(model: torch.nn.Module, prefix_ids: torch.Tensor, prefix_mask: torch.Tensor, rows: torch.Tensor) -> Cache:
    """The KV cache of the left-padded ``prefix_ids`` (D, P), one pass, then copied to ``rows`` (B,)."""
    positions = (prefix_mask.cumsum(-1) - 1).masked_fill(prefix_mask == 0, 0)
    out = model(
        input_ids=prefix_ids, attention_mask=prefix_mask, position_ids=positions, use_cache=True, logits_to_keep=1
    )
    cache = out.past_key_values
    cache.reorder_cache(rows)  # (D, ...) -> (B, ...); an index_select, so gradients sum over a prompt's rows
    return cache


def _can_share(model: torch.nn.Module) -> bool:
    config = getattr(model, "active_peft_config", None)
    if getattr(config, "is_prompt_learning", False):
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base, "is_activation_checkpointing", False):
        return False
    # with dropout on, G passes over a prompt draw G masks; one shared pass would draw one for all G rows
    return not (
        model.training and any(isinstance(m, torch.nn.Dropout) and m.p > 0 and m.training for m in model.modules())
    )
