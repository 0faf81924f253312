"""Logit probes: what a trained policy adapter predicted, saved with it, so any later process can prove
that the adapter it loaded is the one that was trained (same logits, to float tolerance).

This is how the DeepSpeed tests check that an adapter gathered from ZeRO shards and saved by rank 0
is whole: a fresh process loads it with plain PEFT and must reproduce ``probe_logits.safetensors``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from stages.model.placement import model_device

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PROBE_FILE = "probe_logits.safetensors"
PROBE_TEXTS = ("3+4=", "12+19=", "7+0=7", "Hello, world")


def probe_inputs(tokenizer: PreTrainedTokenizerBase, device: torch.device | str) -> dict[str, torch.Tensor]:
    """The probe texts right-padded on ``device``: input_ids and attention_mask, (N, T) each."""
    batch = tokenizer(list(PROBE_TEXTS), padding=True, padding_side="right")
    return {
        name: torch.tensor(batch[name], dtype=torch.long, device=device) for name in ("input_ids", "attention_mask")
    }


def probe_logits(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """Logits of the active adapter on the fixed probe texts, (N, T, V) in float32, on the CPU."""
    with torch.no_grad():
        return model(**probe_inputs(tokenizer, model_device(model))).logits.float().cpu()


def save_probe(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    save_file(
        {"logits": probe_logits(model, tokenizer).contiguous(), **probe_inputs(tokenizer, "cpu")},
        str(Path(folder) / PROBE_FILE),
    )
