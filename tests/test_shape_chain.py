"""The pieces of ``bench/gpu_check.sh`` step 5 that a CPU checks in seconds: Qwen2.5-0.5B's shape without
allocating it, the tiny shape's folder as a stage loads it, the chain's settings at both shapes, and the peak
memory a stage process records (``stages.training.entry.record_peaks``)."""

import json
from pathlib import Path

import pytest

from bench.qwen_shape import QWEN25_05B_PARAMETERS, SHAPES, build, parameter_count, qwen_config
from bench.shape_chain import CHAT, overrides
from stages.io.config import load_config
from stages.training.entry import record_peaks


def test_the_05b_shape_is_qwen25_05b_counted_on_the_meta_device() -> None:
    config = qwen_config("0.5b")
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (24, 896, 4864)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (14, 2, 151936)
    assert config.tie_word_embeddings and config.rope_parameters["rope_theta"] == 1e6
    assert parameter_count("0.5b") == QWEN25_05B_PARAMETERS == 494_032_768  # the hub's count, tied embeddings


def test_the_tiny_shape_builds_a_folder_a_stage_loads_with_qwens_chat_template(tmp_path: Path) -> None:
    from stages.model.backbone import stage_backbone

    folder = build(tmp_path / "tiny", "tiny")
    cfg = load_config(CHAT, overrides("tiny", "cpu", folder))
    backbone, tokenization = stage_backbone(cfg)
    assert type(backbone.model).__name__ == "Qwen2ForCausalLM"
    assert backbone.model.num_parameters() == parameter_count("tiny")
    assert backbone.model.config.num_hidden_layers == SHAPES["tiny"].layers
    prompt = [{"role": "user", "content": "2+3="}]
    assert backbone.tokenizer.decode(tokenization.prompt_ids(prompt)).startswith("<|im_start|>system\nYou are Qwen")
    assert tokenization.stop_id(prompt) == backbone.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert json.loads((folder / "generation_config.json").read_text())["top_k"] == 20  # the family's, not a default


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_the_chains_settings_are_a_valid_config_at_every_shape(shape: str, device: str) -> None:
    cfg = load_config(CHAT, overrides(shape, device, "a/folder"))
    assert cfg.run.stages == ["sft", "reward", "rrhf", "ppo", "dpo", "grpo"]
    assert cfg.backbone.device == device and cfg.tracking.backend == "none"


def test_a_stage_process_appends_its_peaks_when_asked(tmp_path: Path) -> None:
    peaks = tmp_path / "peaks.jsonl"
    record_peaks("sft", "")  # unset: nothing written anywhere
    record_peaks("sft", str(peaks))
    record_peaks("reward", str(peaks))
    rows = [json.loads(line) for line in peaks.read_text().splitlines()]
    assert [(row["stage"], row["rank"]) for row in rows] == [("sft", 0), ("reward", 0)]
    assert all(row["peak_rss_mib"] > 0 and "peak_gpu_allocated_mib" not in row for row in rows)  # no CUDA here
