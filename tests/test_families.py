"""The family fixtures themselves (tests/families.py): each folder loads, renders its real chat template,
agrees with its hub generation_config on the special-token ids, and tokenizes the way its family does.
The tokenization contract on these families is tested elsewhere; these only prove the fixtures are right."""

import json
from pathlib import Path

import pytest
from jinja2.exceptions import TemplateError
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from tests.families import FAMILIES, family_folder

USER = [{"role": "user", "content": "3+4="}]
# The hub template's rendering of USER with the generation prompt, per family.
RENDERED = {
    "mistral-v0.1": "<s>[INST] 3+4= [/INST]",
    "mistral-v0.3": "<s>[INST] 3+4=[/INST]",
    "llama-3.1": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n3+4=<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "qwen2.5-instruct": (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
        "<|im_end|>\n<|im_start|>user\n3+4=<|im_end|>\n<|im_start|>assistant\n"
    ),
    "deepseek-v3": "<｜begin▁of▁sentence｜><｜User｜>3+4=<｜Assistant｜>",
}
RENDERED["qwen2.5-base"] = RENDERED["qwen2.5-instruct"]  # the base model ships the Instruct template
# Expected renderings of a longer chat that the template's public copies pin (mistral.rs chat-template tests;
# llama.cpp tests/test-chat-template.cpp, there with an empty BOS): the templates are the hub's, byte for byte.
CHAT = [
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi there"},
    {"role": "user", "content": "Who are you"},
    {"role": "assistant", "content": "   I am an assistant   "},
    {"role": "user", "content": "Another question"},
]
PINNED = {
    "mistral-v0.1": (
        [],
        "<s>[INST] Hello [/INST]Hi there</s> [INST] Who are you [/INST]   I am an assistant   </s> "
        "[INST] Another question [/INST]",
    ),
    "mistral-v0.3": (
        [{"role": "system", "content": "You are a helpful assistant"}],
        "<s>[INST] Hello[/INST] Hi there</s>[INST] Who are you[/INST] I am an assistant</s>"
        "[INST] You are a helpful assistant\n\nAnother question[/INST]",
    ),
}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest) -> tuple[str, Path, object]:
    folder = family_folder(request.param)
    return request.param, folder, AutoTokenizer.from_pretrained(folder)


def test_each_family_loads_with_a_model_that_covers_every_token(family) -> None:
    name, folder, tokenizer = family
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.vocab_size == len(tokenizer)
    assert max(tokenizer.get_vocab().values()) < model.config.vocab_size
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    assert model.config.pad_token_id == tokenizer.pad_token_id


def test_the_chat_template_renders_a_user_turn_once_with_bos(family) -> None:
    name, _, tokenizer = family
    text = tokenizer.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    assert text == RENDERED[name]
    ids = tokenizer.apply_chat_template(USER, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids == tokenizer(text, add_special_tokens=False).input_ids  # the template writes BOS, nothing adds one
    if tokenizer.bos_token is not None:
        assert ids.count(tokenizer.bos_token_id) == 1
        # Tokenizing the rendered text with special tokens doubles BOS where the tokenizer adds one too.
        adds_bos = tokenizer("x").input_ids[0] == tokenizer.bos_token_id
        assert tokenizer(text).input_ids.count(tokenizer.bos_token_id) == 1 + adds_bos
    if name in PINNED:
        system, pinned = PINNED[name]
        assert tokenizer.apply_chat_template(system + CHAT, tokenize=False, add_generation_prompt=True) == pinned


def test_special_token_ids_are_the_generation_configs(family) -> None:
    name, folder, tokenizer = family
    generation = GenerationConfig.from_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    end_ids = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [generation.eos_token_id]
    assert tokenizer.eos_token_id in end_ids
    assert config["eos_token_id"] in (generation.eos_token_id, tokenizer.eos_token_id)
    if tokenizer.bos_token is not None:
        assert tokenizer.bos_token_id == generation.bos_token_id == config["bos_token_id"]
    if generation.pad_token_id is not None:
        assert tokenizer.pad_token_id == generation.pad_token_id
    # The ids the hub names, named here as the hub names them.
    if name == "llama-3.1":
        assert tokenizer.convert_ids_to_tokens(end_ids) == ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]
        assert tokenizer("x").input_ids[0] == 128000 and tokenizer.pad_token is None  # BOS from the tokenizer
    if name.startswith("qwen"):
        assert tokenizer.convert_ids_to_tokens(end_ids) == (
            ["<|im_end|>", "<|endoftext|>"] if name.endswith("instruct") else ["<|endoftext|>"]
        )
        assert tokenizer.bos_token is None and tokenizer.pad_token == "<|endoftext|>"
    if name == "deepseek-v3":
        assert tokenizer.pad_token_id == tokenizer.eos_token_id == 1 and tokenizer("x").input_ids[0] != 0


def test_mistral_v01_is_sentencepiece_with_the_dummy_prefix() -> None:
    tokenizer = AutoTokenizer.from_pretrained(family_folder("mistral-v0.1"))
    joined = tokenizer.convert_ids_to_tokens(tokenizer("3+4=" + "7").input_ids)
    assert joined == ["<s>", "▁", "3", "+", "4", "=", "7"]
    # Tokenized on its own the response gets a word-start piece too: the space issue 28's fault 1 invents.
    assert tokenizer.convert_ids_to_tokens(tokenizer("7", add_special_tokens=False).input_ids) == ["▁", "7"]
    # Legacy: "▁" also follows a special token, as on the hub ("<s>[INST]" is 1, 733 "▁[").
    assert tokenizer("[INST]").input_ids[:2] == [1, 733]
    with pytest.raises(TemplateError, match="Conversation roles must alternate"):
        tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."}] + USER, tokenize=False)


def test_a_folder_is_built_once_into_its_own_cache(tmp_path: Path) -> None:
    folder = family_folder("mistral-v0.3", root=tmp_path)
    assert folder.parent.parent == tmp_path and folder.name == "mistral-v0.3"
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert family_folder("mistral-v0.3", root=tmp_path) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in folder.parent.iterdir() if p.is_dir()] == ["mistral-v0.3"]  # no half-built leftovers
    with pytest.raises(ValueError, match="unknown family 'gpt-2'"):
        family_folder("gpt-2", root=tmp_path)
