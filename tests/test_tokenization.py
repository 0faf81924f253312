"""The tokenization contract, on both built-in tokenizers and on hub-style chat templates: BOS once,
the end token once, the template's end of turn, the prompt/response boundary, padding; and parity:
for the same (prompt, response), the ids SFT trains on (through TRL's SFTTrainer), the ids the reward
model scores, the ids DPO trains on (through TRL's DPOTrainer), the ids a PPO rollout produces and the
ids evaluation prompts with are identical, for every data format."""

from pathlib import Path

import pytest
import torch
from trl.trainer.dpo_trainer import DataCollatorForPreference

from stages.dpo.pairs import tokenized_pairs
from stages.io.builtin_spec import CHAT_TEMPLATE
from stages.io.config import BackboneSection, load_config
from stages.io.data import DataError, load_records, measure_lengths
from stages.model.backbone import load_backbone
from stages.model.builtin_backbone import chat_messages, chat_stream
from stages.model.generation import generate
from stages.model.tokenization import Tokenization, TokenizationError
from stages.reward.recipe import preference_batch
from stages.sft.recipe import build_sft_trainer, sft_dataset
from stages.training.distributed import LOCAL
from tests.conftest import REPO
from tests.families import FAMILIES, family_folder

EXAMPLES = REPO / "examples" / "data"
USER = [{"role": "user", "content": "3+4="}]
TOKENIZERS = ("builtin:tiny", "builtin:tiny-chat")
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA2 = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


class _Backbones(dict):
    """Backbones by name, each loaded on first use: the built-in ones, and the families of tests/families.py."""

    def __missing__(self, name: str):
        self[name] = load_backbone(BackboneSection(name=_location(name)))
        return self[name]


def _location(name: str) -> str:
    return name if name in TOKENIZERS else str(family_folder(name))


@pytest.fixture(scope="module")
def backbones() -> dict:
    return _Backbones()


def _tokens(tok: Tokenization, ids: list[int]) -> list[str]:
    return tok.tokenizer.convert_ids_to_tokens(ids)


def test_the_simple_tokenizer_adds_no_bos_and_ends_with_eos(backbones) -> None:
    tok = Tokenization.of(backbones["builtin:tiny"].tokenizer)
    assert (tok.bos_id, tok.turn_end_id, tok.stop_ids) == (None, None, (tok.eos_id,))
    prompt, response = tok.pair("3+4=", "7")
    assert _tokens(tok, prompt + response) == ["3", "+", "4", "=", "7", "</s>"]
    with pytest.raises(TokenizationError, match="conversational data needs a chat template"):
        tok.prompt_ids(USER)
    with pytest.raises(TokenizationError, match="data.chat_template=always, but the tokenizer has no chat template"):
        Tokenization.of(backbones["builtin:tiny"].tokenizer, "always")


def test_the_chat_tokenizer_bos_once_template_and_end_of_turn(backbones) -> None:
    tokenizer = backbones["builtin:tiny-chat"].tokenizer
    assert tokenizer.pad_token == tokenizer.eos_token  # it ships without one; load_backbone uses EOS
    tok = Tokenization.of(tokenizer)
    prompt, response = tok.pair(USER, "7")
    # The template writes {{ bos_token }} and the tokenizer adds BOS too: the classic double BOS, avoided.
    assert _tokens(tok, prompt + response) == [
        "<s>",
        "<|user|>",
        "3",
        "+",
        "4",
        "=",
        "<|end|>",
        "<|assistant|>",
        "7",
        "<|end|>",
    ]
    assert tok.stop_ids == (tok.eos_id, tok.turn_end_id)
    # A response whose text already ends with the end token gets no second one.
    assert tok.response_ids(USER, "7<|end|>") == response
    # Standard prompts: BOS once, EOS at the end; with data.chat_template=always, the template.
    assert _tokens(tok, sum(tok.pair("3+4=", "7"), [])) == ["<s>", "3", "+", "4", "=", "7", "</s>"]
    assert tok.response_ids("3+4=", "7</s>") == tok.response_ids("3+4=", "7")
    always = Tokenization.of(tokenizer, "always")
    assert always.pair("3+4=", "7") == (prompt, response)
    assert always.pair("", "3+4=7") == tok.pair("", "3+4=7")  # language-modeling text has no turns: plain
    # A response text ending in EOS under the template: that EOS ends it, no turn end after it.
    assert _tokens(tok, tok.response_ids(USER, "7</s>")) == ["7", "</s>"]
    with pytest.raises(TokenizationError, match="data.chat_template=never"):
        Tokenization.of(tokenizer, "never").prompt_ids(USER)


def test_the_chat_template_renders_what_the_backbone_was_pretrained_on(backbones) -> None:
    tokenizer = backbones["builtin:tiny-chat"].tokenizer
    assert tokenizer.chat_template == CHAT_TEMPLATE
    line = "3+4=7;1+1=2;5+6=11;2+2=4;9+9=18;"
    messages = chat_messages(line)  # three turns: each answer right after the assistant's role token
    assert messages[:2] == USER + [{"role": "assistant", "content": "7;1+1=2;"}]
    assert [m["content"] for m in messages[2:]] == ["5+6=", "11;2+2=4;", "9+9=", "18;"]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == chat_stream(line)


@pytest.mark.parametrize(
    ("template", "prompt_end", "end"),
    [
        (CHATML, "<|im_start|>assistant\n", "<|im_end|>"),
        (
            CHATML.replace("{{ m['content'] }}<|im_end|>", "{{ m['content'] }}\n<|im_end|>"),
            "<|im_start|>assistant\n",
            "<|im_end|>",
        ),  # text between the content and the end token: the end token is still found
        (LLAMA2, " [/INST]", "</s>"),
    ],
)
def test_hub_style_templates_end_turns_where_the_template_does(
    backbones, template: str, prompt_end: str, end: str
) -> None:
    """ChatML (Qwen) ends an assistant turn with a special token of its own; Llama-2 with EOS."""
    tokenizer = backbones["builtin:tiny"].tokenizer.__class__.from_pretrained(
        backbones["builtin:tiny"].tokenizer.name_or_path
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = template
    tok = Tokenization.of(tokenizer)
    prompt, response = tok.pair(USER, "7")
    text = tokenizer.decode(prompt)
    assert text.endswith(prompt_end) and text.count("<s>") == (1 if template == LLAMA2 else 0)
    assert _tokens(tok, response) == ["7", end] and tok.stop_id(USER) == tokenizer.convert_tokens_to_ids(end)


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize(("prompt", "response"), [("Q: 3+4= ", "7"), ("You are the ass", "istant")])
def test_the_boundary_prompt_then_response_ids_never_the_joined_string(
    backbones, name: str, prompt: str, response: str
) -> None:
    """A prompt ending in whitespace keeps it as its own token; a response that would merge with the
    prompt's last token ("ass" + "istant" is one token, "assistant", when joined) is tokenized on its own.
    SFT, the reward model, rollouts and evaluation all see exactly these ids (the parity test below)."""
    tok = Tokenization.of(backbones[name].tokenizer)
    plain = backbones[name].tokenizer
    bos = [tok.bos_id] if tok.bos_id is not None else []
    prompt_ids, response_ids = tok.pair(prompt, response)
    assert prompt_ids == bos + plain(prompt, add_special_tokens=False).input_ids
    assert response_ids == plain(response, add_special_tokens=False).input_ids + [tok.eos_id]
    if response == "istant":
        joined = plain(prompt + response, add_special_tokens=False).input_ids
        assert _tokens(tok, joined)[-1] == "assistant" and prompt_ids + response_ids != bos + joined + [tok.eos_id]


def test_the_template_decides_bos_and_its_refusals_are_one_line_errors(backbones) -> None:
    """The chat tokenizer adds BOS to plain text; a template that writes none gets none (as
    ``apply_chat_template(tokenize=True)`` and TRL do), and a template's raise_exception is a user error."""
    tokenizer = backbones["builtin:tiny-chat"].tokenizer.__class__.from_pretrained(
        backbones["builtin:tiny-chat"].tokenizer.name_or_path
    )
    tokenizer.chat_template = CHAT_TEMPLATE.replace("{{ bos_token }}", "").replace(
        "{% for message in messages %}",
        "{% for message in messages %}{% if message['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}",
    )
    tok = Tokenization.of(tokenizer)
    assert _tokens(tok, tok.prompt_ids(USER))[:2] == ["<|user|>", "3"]
    assert tok.prompt_ids("3+4=")[0] == tok.bos_id
    with pytest.raises(TokenizationError, match="the chat template refuses these messages .*System role not supported"):
        tok.prompt_ids([{"role": "system", "content": "be brief"}, *USER])


def test_special_tokens_in_a_response_are_kept_in_its_text(backbones) -> None:
    """``<|assistant|>7`` is not the answer ``7``: the checker sees the special token."""
    from stages.io.arithmetic import check

    tok = Tokenization.of(backbones["builtin:tiny-chat"].tokenizer)
    ids = tok.tokenizer.convert_tokens_to_ids(["<|assistant|>", "7"])
    assert tok.text(ids) == "<|assistant|>7" and not check(tok.text(ids), "7")


def _force(model: torch.nn.Module, targets: list[int]):
    """Make the real model's LM head emit ``targets`` one per generation step (a forward hook)."""
    step = {"n": 0}

    def hook(module, inputs, output):
        forced = torch.full_like(output, -1e9)
        forced[..., targets[min(step["n"], len(targets) - 1)]] = 0.0
        step["n"] += 1
        return forced

    return model.lm_head.register_forward_hook(hook)


FORMATS = [
    ("sft-prompt-completion.jsonl", "sft"),
    ("sft-prompt-completion-conversational.jsonl", "sft"),
    ("sft-messages.jsonl", "sft"),
    ("preferences-explicit.jsonl", "preferences"),
    ("preferences-implicit-hh.jsonl", "preferences"),
    ("preferences-implicit-conversational.jsonl", "preferences"),
    ("preferences-ultrafeedback.jsonl", "preferences"),
    ("eval.jsonl", "eval"),
    ("eval-conversational.jsonl", "eval"),
]


@pytest.mark.parametrize("name", TOKENIZERS + FAMILIES)
@pytest.mark.parametrize(("file", "kind"), FORMATS)
def test_every_stage_uses_the_same_ids(backbones, tmp_path: Path, name: str, file: str, kind: str) -> None:
    record = load_records(str(EXAMPLES / file), kind, load_config().task)[0]
    prompt = record["prompt"]
    response = record.get("completion") or record.get("chosen") or record["answer"]
    backbone = backbones[name]
    tok = backbone.tokenization()
    if isinstance(prompt, list) and tok.turn_end_id is None:
        with pytest.raises(DataError, match="record 1: conversational data needs a chat template"):
            measure_lengths([record], kind, file, tok, 128)
        return
    prompt_ids, response_ids = tok.pair(prompt, response)
    expected = prompt_ids + response_ids

    # SFT: what TRL's SFTTrainer trains on, after its own preparation, and its loss mask.
    cfg = load_config(None, [f"backbone.name={_location(name)}", "sft.max_steps=1", "tracking.backend=none"])
    trainer = build_sft_trainer(
        backbone.model,
        tok,
        sft_dataset([{"prompt": prompt, "completion": response}], tok, cfg.sft.max_length),
        cfg,
        tmp_path / "sft",
        LOCAL,
    )
    row = trainer.train_dataset[0]
    assert row["input_ids"] == expected
    assert row["labels"] == [-100] * len(prompt_ids) + response_ids

    # Reward model: the rows it scores (chosen, then rejected).
    pair = {"prompt": prompt, "chosen": response, "rejected": response + " no"}
    batch = preference_batch(tok, [pair], "cpu")
    assert batch.input_ids[0, : batch.attention_mask[0].sum()].tolist() == expected

    # DPO: what TRL's DPOTrainer collates from the rows the stage gives it (chosen first, then rejected).
    dpo = DataCollatorForPreference(pad_token_id=tok.pad_id)(tokenized_pairs([pair], tok))
    assert dpo["input_ids"][0, : dpo["attention_mask"][0].sum()].tolist() == expected
    assert dpo["completion_mask"][0, : len(expected)].tolist() == [0] * len(prompt_ids) + [1] * len(response_ids)

    # PPO rollout and evaluation: generation fed the contract's prompt ids, the model made to emit the response.
    handle = _force(backbone.model, response_ids)
    try:
        sample = generate(
            backbone.model,
            tok,
            [tok.prompt_ids(prompt)],
            max_new_tokens=len(response_ids) + 3,
            temperature=1.0,
            batch_size=1,
            seed=0,
        )[0]
    finally:
        handle.remove()
    assert list(sample.prompt_ids) + list(sample.token_ids) == expected
    # The text is the response's ids decoded alone, as TRL hands completions to reward functions: a
    # SentencePiece tokenizer drops the space of a leading word-start "▁" there (HH's " 14" reads "14").
    assert sample.finished and sample.text == (response.lstrip(" ") if name.startswith("mistral") else response)


def test_sft_keeps_the_real_eos_in_the_labels_when_pad_is_eos(backbones, tmp_path: Path) -> None:
    """The chat tokenizer has no pad token, so EOS pads; the final EOS of a demonstration is still learned."""
    backbone = backbones["builtin:tiny-chat"]
    tok = Tokenization.of(backbone.tokenizer)
    assert tok.pad_id == tok.eos_id
    cfg = load_config(None, ["backbone.name=builtin:tiny-chat", "sft.max_steps=1", "tracking.backend=none"])
    demos = [{"prompt": "1+1=", "completion": "2"}, {"prompt": "12+13=", "completion": "25;3+4=7"}]
    trainer = build_sft_trainer(
        backbone.model, tok, sft_dataset(demos, tok, cfg.sft.max_length), cfg, tmp_path / "sft", LOCAL
    )
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    short = batch["labels"][0].tolist()
    length = len(tok.prompt_ids("1+1=")) + 2
    assert short[length - 1] == tok.eos_id and all(label == -100 for label in short[length:])
    assert batch["input_ids"][0, length:].eq(tok.eos_id).all()  # padded with EOS, masked by length only
