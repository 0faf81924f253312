"""The tokenization contract on real chat-model families (issue 28): tiny random models next to the real
tokenizer files, chat templates and hub generation configs of Mistral v0.1/v0.3 (SentencePiece), a Llama
3.1-style BPE, Qwen2.5 Instruct and base, and DeepSeek-V3 (tests/families.py builds them offline).

For each family: plain rows decode to the data's text (no invented SentencePiece space, fault 1), BOS
once, one end token, chat ids equal the family's own rendering, the stop set holds the model's
generation_config end ids and a sampled one ends the response (fault 3, also in ``rlhf export``), and
the log-probs sampling records equal the training forward's under the family's generation config
(fault 2)."""

import pytest
import torch

from stages.io.config import BackboneSection, load_config
from stages.model.backbone import Backbone, load_backbone
from stages.model.generation import generate
from stages.model.sequences import sampled_batch, token_logprobs
from stages.tools.export import _stop_where_the_stages_stop
from stages.training.logprob_gap import GAP_LIMITS
from tests.families import FAMILIES, family_folder

USER = [{"role": "user", "content": "3+4="}]
# Each family's stop set, from its hub files (tokenizer EOS, the template's end of turn, generation_config).
STOPS = {
    "mistral-v0.1": {"</s>"},
    "mistral-v0.3": {"</s>"},
    "llama-3.1": {"<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"},
    "qwen2.5-instruct": {"<|im_end|>", "<|endoftext|>"},
    "qwen2.5-base": {"<|im_end|>", "<|endoftext|>"},
    "deepseek-v3": {"<｜end▁of▁sentence｜>"},
}
SHARPEN = 200.0  # embedding scale that makes a random tiny model's logits of order 10
# (prompt, response) rows of plain-string data, with boundaries that SentencePiece and BPE treat differently.
PLAIN = [
    ("3+4=", "7"),
    ("### Response:\n", "Paris"),
    ("Question: ", "Paris"),
    ("Q:", " Paris"),
    ("a", "b c"),
    ("Translate: ", "¿Dónde está?"),
    ("x", "\n- item"),
]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest) -> tuple[str, Backbone]:
    return request.param, load_backbone(BackboneSection(name=str(family_folder(request.param))))


def test_plain_rows_decode_to_the_data_and_keep_the_prompt_ids(family) -> None:
    name, backbone = family
    tok = backbone.tokenization()
    for prompt, response in PLAIN:
        prompt_ids, response_ids = tok.pair(prompt, response)
        assert prompt_ids == tok.prompt_ids(prompt)  # generation continues exactly these
        assert response_ids[-1] == tok.eos_id and tok.eos_id not in response_ids[:-1], (name, prompt)
        assert tok.text(prompt_ids + response_ids[:-1]) == tok.text(prompt_ids) + response, (name, prompt, response)
        assert (
            prompt_ids.count(tok.bos_id) == 1
            if tok.bos_id is not None
            else tok.tokenizer.bos_token_id not in prompt_ids
        )
    # Fault 1 where it was found: "3+4=" + "7" trained on "= ▁7", decoded "3+4= 7".
    if name.startswith("mistral"):
        assert tok.tokenizer.convert_ids_to_tokens(tok.response_ids("3+4=", "7")) == ["7", "</s>"]


def test_chat_rows_are_the_familys_own_rendering_with_bos_once_and_one_end(family) -> None:
    name, backbone = family
    tok, tokenizer = backbone.tokenization(), backbone.tokenizer
    prompt_ids, response_ids = tok.pair(USER, "7")
    own = tokenizer.apply_chat_template(USER, add_generation_prompt=True, tokenize=True)  # transformers' own path
    assert prompt_ids == list(own["input_ids"] if hasattr(own, "keys") else own), name
    if tokenizer.bos_token_id is not None and tokenizer.bos_token in tokenizer.chat_template:
        assert prompt_ids.count(tokenizer.bos_token_id) == 1, name  # the template writes it, the tokenizer may add it
    assert response_ids[-1] == tok.turn_end_id and response_ids.count(tok.turn_end_id) == 1, name
    assert tok.text(response_ids[:-1]) == "7", name
    assert tok.response_ids(USER, "7" + tokenizer.convert_ids_to_tokens(tok.turn_end_id)) == response_ids


def test_the_stop_set_holds_the_models_end_ids_and_the_export_keeps_them(family) -> None:
    name, backbone = family
    tok = backbone.tokenization()
    assert set(backbone.tokenizer.convert_ids_to_tokens(list(tok.stop_ids))) == STOPS[name]
    cfg = load_config(None, [f"backbone.name={family_folder(name)}"])
    exported = _ModelStub(
        backbone.model.generation_config.__class__.from_dict(backbone.model.generation_config.to_dict())
    )
    _stop_where_the_stages_stop(exported, backbone.tokenizer, cfg)
    ends = exported.generation_config.eos_token_id
    assert set([ends] if isinstance(ends, int) else ends) == set(tok.stop_ids), name


class _ModelStub:  # what _stop_where_the_stages_stop reads and writes of a merged model
    def __init__(self, generation_config) -> None:
        self.generation_config = generation_config


@pytest.mark.parametrize("name", ["llama-3.1", "qwen2.5-instruct"])
def test_a_sampled_end_id_of_the_generation_config_ends_the_response(name: str) -> None:
    """Fault 3 where it was found: Llama 3.1's <|eom_id|> and <|end_of_text|>, Qwen's <|endoftext|>
    were sampled, counted as unfinished, and the tokens after them trained on."""
    backbone = load_backbone(BackboneSection(name=str(family_folder(name))))
    tok, model = backbone.tokenization(), backbone.model
    only_in_generation_config = [i for i in tok.model_end_ids if i not in (tok.eos_id, tok.turn_end_id)]
    assert only_in_generation_config, name
    for end in only_in_generation_config:
        head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
        with torch.no_grad():
            head.weight.copy_(model.get_output_embeddings().weight)
            head.bias.zero_()
            head.bias[end] = 100.0  # the model all but always samples this end id first
        model.lm_head = head
        [response] = generate(
            model, tok, [tok.prompt_ids(USER)], max_new_tokens=6, temperature=1.0, batch_size=1, seed=0
        )
        assert response.finished and response.token_ids == (end,), (name, end, response)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sampling_logprobs_equal_the_training_forwards_under_each_generation_config(family, dtype: str) -> None:
    """Fault 2 (Qwen2.5-Instruct's repetition_penalty 1.05, top_k 20): the recorded log-probs were up to
    0.64 nats off the training forward's. Measured here as the largest gap over 8 sampled responses, with
    the (tied) embeddings scaled up so that the random model's next-token distributions are as peaked as a
    trained model's (logits of order 10, where a penalty moves them; near 0 it would not)."""
    name, backbone = family
    original = {key: value.clone() for key, value in backbone.model.state_dict().items()}
    with torch.no_grad():
        backbone.model.get_input_embeddings().weight.mul_(SHARPEN)
    model = backbone.model.to(getattr(torch, dtype))
    try:
        tok = backbone.tokenization()
        prompts = [
            tok.prompt_ids(USER),
            tok.prompt_ids("3+4="),
            tok.prompt_ids([{"role": "user", "content": "Hi"}]),
        ] * 3
        samples = generate(model, tok, prompts[:8], max_new_tokens=12, temperature=1.0, batch_size=8, seed=1)
        batch, sampled = sampled_batch(samples, tok.pad_id, "cpu")
        with torch.no_grad():
            trained = token_logprobs(model, batch, 1.0)
        gap = ((sampled - trained.float()).abs() * batch.response_mask).max().item()
        print(f"{name} {dtype}: largest sampling/training log-prob gap {gap:.3g} nats")
        assert gap < GAP_LIMITS[dtype].largest, (name, dtype, gap)
    finally:
        backbone.model.float().load_state_dict(original)


def test_batched_pairs_equal_one_by_one_pairs(family) -> None:
    """``Tokenization.pairs`` (what the dataset store keeps) gives every row exactly ``pair``'s ids: plain rows
    with their boundary cases, chat rows, a response that already ends with an end token, empty text."""
    name, backbone = family
    for chat_template in ("auto", "always"):
        tok = backbone.tokenization(chat_template)
        end = tok.text([tok.stop_id(USER)])
        rows = [*PLAIN, ("", "3+4=7"), (USER, "7"), (USER, "7" + end), (USER, " Paris"), ("3+4=", "7;1+1=2")]
        prompts, responses = [p for p, _ in rows], [r for _, r in rows]
        assert tok.pairs(prompts, responses) == [tok.pair(p, r) for p, r in rows], (name, chat_template)
