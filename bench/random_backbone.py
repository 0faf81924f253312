"""A random-init Llama of a chosen size with the built-in tokenizer, saved as a local backbone folder.

Benchmarks use it as ``backbone.name: <folder>`` to measure the real stages at sizes the built-in tiny
backbone cannot show; the built-in tokenizer keeps the built-in data readable by it.
"""

from __future__ import annotations

import shutil
from pathlib import Path


def random_llama(folder: Path, builtin: Path, *, layers: int, hidden: int, intermediate: int, heads: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    ref = LlamaConfig.from_pretrained(builtin)
    config = LlamaConfig(
        vocab_size=ref.vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=ref.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=ref.pad_token_id,
        bos_token_id=ref.bos_token_id,
        eos_token_id=ref.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(builtin / name, folder / name)
    return folder


def parameter_count(folder: Path) -> int:
    import math

    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        return sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())
