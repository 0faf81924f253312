"""SFT packing (``sft.packing``, issue 31): TRL's best-fit-decreasing packing, trained padding-free.

Packing changes which demonstrations share a batch, never what a demonstration contributes: the loss of
a packed batch equals the token-weighted loss of the same demonstrations unpacked (attention stays within
each demonstration, the labels keep their prompt mask, no loss crosses a boundary)."""

from pathlib import Path

import pytest
import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from stages.io.config import BackboneSection, load_config
from stages.model.backbone import load_backbone
from stages.model.tokenization import Tokenization
from stages.sft.recipe import sft_dataset, train_sft
from stages.training.runner import execute
from tests.conftest import TINY

DEMOS = [
    {"prompt": "1+1=", "completion": "2"},
    {"prompt": "12+13=", "completion": "25;3+4=7"},
    {"prompt": "7+8=", "completion": "15;1+2=3;4+4=8"},
    {"prompt": "", "completion": "3+4=7;10+10=20"},  # language modelling: loss on all of it
    {"prompt": "40+2=", "completion": "42"},
    {"prompt": "99+1=", "completion": "100;5+5=10"},
]


def test_a_packed_batch_has_the_loss_of_its_demonstrations_unpacked() -> None:
    backbone = load_backbone(BackboneSection())
    tok = Tokenization.of(backbone.tokenizer)
    rows = sft_dataset(DEMOS, tok, max_length=32)
    packed = sft_dataset(DEMOS, tok, max_length=32, packing=True)
    assert len(packed) < len(rows), "short demonstrations share rows"
    assert sum(map(sum, packed["seq_lengths"])) == sum(len(r) for r in rows["input_ids"])  # nothing cut or lost
    padded = DataCollatorForLanguageModeling(pad_token_id=tok.pad_id)(rows.to_list())
    flat = DataCollatorForLanguageModeling(pad_token_id=tok.pad_id, padding_free=True)(packed.to_list())
    assert "attention_mask" not in flat and flat["input_ids"].shape[0] == 1  # one sequence, its own positions
    assert int((flat["labels"] != -100).sum()) == int((padded["labels"][:, 1:] != -100).sum())  # same targets
    with torch.no_grad():  # use_cache=False as TRL's compute_loss passes it (a cache turns the packed mask off)
        unpacked_loss = backbone.model(**padded, use_cache=False).loss
        packed_batch = {key: flat[key] for key in ("input_ids", "labels", "position_ids")}
        packed_loss = backbone.model(**packed_batch, use_cache=False).loss
    assert packed_loss.item() == pytest.approx(unpacked_loss.item(), abs=1e-5)


def test_the_sft_stage_trains_packed(tmp_path: Path) -> None:
    cfg = load_config(None, [*TINY, "sft.max_steps=3", "sft.packing=true", "tracking.backend=none"])
    metrics = execute("sft", train_sft, cfg, tmp_path / "sft", {})["metrics"]
    assert metrics["train_loss"] > 0 and (tmp_path / "sft" / "adapter" / "adapter_config.json").is_file()
