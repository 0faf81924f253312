"""The tokenization contract: how (prompt, response) becomes token ids, the same in every stage.

SFT training, reward training and scoring, PPO/RRHF rollouts and scoring, and evaluation all take
their ids from one ``Tokenization``, and generation is fed its prompt ids and returns ids in its shape,
so a reward model scores exactly the tokens a policy sampled and SFT trained on.

The rules:

* **Prompt.** A conversational prompt (messages), or any non-empty prompt under ``data.chat_template:
  always``, is rendered by the tokenizer's chat template with the generation prompt and tokenized
  without special tokens: the template decides about BOS (Llama-3's writes ``{{ bos_token }}``, Qwen's
  none), exactly as ``apply_chat_template(tokenize=True)`` and TRL do. A standard prompt is its text,
  tokenized without special tokens, with BOS in front if the tokenizer adds one by itself. Either way
  BOS appears once, never twice.
* **Response.** Its text tokenized without special tokens, then, if the response finished, its end
  token: the template's end of an assistant turn (``<|im_end|>``, ``<|eot_id|>``, ...) for a templated
  prompt, EOS otherwise; once (a response text that already ends with an end token gets no second).
  Generation stops at either end token; the one it emitted stays in the sampled ids that are scored.
* **Boundary.** The ids are the prompt's ids followed by the response's ids: a prompt's ids never change
  (generation continues exactly them), and a response never merges into the prompt's last token. For a
  standard prompt the response ids are the ones that continue the prompt's ids into the joined text:
  ``decode(prompt_ids + response_ids) == decode(prompt_ids) + response`` for every tokenizer kind. Alone,
  a SentencePiece tokenizer (Llama-2, Mistral) writes a word-start ``▁`` before a response, so
  ``"3+4="`` + ``"7"`` would train on ``"3+4= 7"`` (issue 28); the tail of the joined text's
  tokenization, as TRL tokenizes it, is used wherever it starts with the prompt's ids, else the
  response's own tokens without that invented space (``continuation_ids``). A templated prompt ends
  in the template's own markup, after which the family's tokenizer encodes each message on its own.
* **End ids.** A response ends at the first of EOS, the template's end of turn and the model's own
  ``generation_config`` end ids (Llama 3.1's ``<|eom_id|>``, Qwen's ``<|endoftext|>``): ``stop_ids``.
* **Padding.** The tokenizer's pad token, or EOS when it has none (``load_backbone``); sequences are
  padded by length (``attention_mask``), so a real EOS is never masked out of labels or scores.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from stages.io.formats import Prompt, is_conversational, prompt_key
from stages.model.sequences import SequenceBatch, from_token_ids

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

ChatTemplateUse = Literal["auto", "always", "never"]
_PROBE_PROMPT, _PROBE_RESPONSE = "PROMPT", "RESPONSE"  # rendered once to find the template's end of turn
_SENTINEL = "\n"  # ends a word in every tokenizer kind: what follows it starts no new SentencePiece word


class TokenizationError(ValueError):
    """Data the tokenizer cannot render as configured (conversational data without a chat template)."""


@dataclass(frozen=True)
class Tokenization:
    """The contract for one tokenizer and one ``data.chat_template`` setting (module docstring)."""

    tokenizer: PreTrainedTokenizerBase
    chat_template: ChatTemplateUse
    bos_id: int | None  # put in front of a standard prompt: the tokenizer adds BOS by itself
    eos_id: int
    pad_id: int
    turn_end_id: int | None  # the chat template's end of an assistant turn; None without a template
    model_end_ids: tuple[int, ...] = ()  # the end ids of the model's generation_config

    @classmethod
    def of(
        cls,
        tokenizer: PreTrainedTokenizerBase,
        chat_template: ChatTemplateUse = "auto",
        model_end_ids: Sequence[int] = (),
    ) -> Tokenization:
        """Read the tokenizer's conventions; ``model_end_ids``: the ``eos_token_id`` (int or list) of the
        model's ``generation_config`` (``stages.model.backbone.Backbone.tokenization`` passes them).
        Raises ``TokenizationError`` for ``always`` without a template."""
        if tokenizer.eos_token_id is None:
            raise TokenizationError("the tokenizer has no EOS token, so no response can end")
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if chat_template == "always" and not has_template:
            raise TokenizationError("data.chat_template=always, but the tokenizer has no chat template")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        turn_end = _turn_end(tokenizer) if has_template and chat_template != "never" else None
        return cls(
            tokenizer, chat_template, _added_bos(tokenizer), tokenizer.eos_token_id, pad, turn_end, tuple(model_end_ids)
        )

    def templated(self, prompt: Prompt) -> bool:
        """Whether ``prompt`` (and its responses) go through the chat template."""
        if is_conversational(prompt):
            if self.chat_template == "never":
                raise TokenizationError("conversational data needs the chat template, but data.chat_template=never")
            if self.turn_end_id is None:
                raise TokenizationError(
                    "conversational data needs a chat template, and the tokenizer has none; "
                    "use a chat model's tokenizer or plain-string data"
                )
            return True
        return self.chat_template == "always" and prompt != ""  # language-modeling text has no turns

    def stop_id(self, prompt: Prompt) -> int:
        """The token that ends a finished response to ``prompt``."""
        return self.turn_end_id if self.templated(prompt) else self.eos_id  # type: ignore[return-value]

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Every token that ends a response, in order: EOS, the template's end of turn, the model's
        ``generation_config`` end ids; generation stops at the first of them (and exports them all)."""
        ids = (self.eos_id, self.turn_end_id, *self.model_end_ids)
        return tuple(dict.fromkeys(i for i in ids if i is not None))

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt: the template's rendering, or the text with BOS where the tokenizer adds one.
        Raises ``TokenizationError`` when the template refuses the messages (roles that do not alternate)."""
        if not self.templated(prompt):
            return self._with_bos(self._ids(prompt))  # type: ignore[arg-type]
        return self._ids(self._rendered(prompt))

    def response_ids(self, prompt: Prompt, response: str, finished: bool = True) -> list[int]:
        """Token ids of a response to ``prompt``, with its end token when ``finished``; a text that already
        ends with an end token (``stop_ids``) gets no second one."""
        ids = self._ids(response) if self.templated(prompt) else self.continuation_ids(prompt, response)  # type: ignore[arg-type]
        ends = bool(ids) and ids[-1] in self.stop_ids
        return ids + [self.stop_id(prompt)] if finished and not ends else ids

    def pair(self, prompt: Prompt, response: str, finished: bool = True) -> tuple[list[int], list[int]]:
        """(prompt ids, response ids): the one encoding of a (prompt, response) in every stage."""
        return self.prompt_ids(prompt), self.response_ids(prompt, response, finished)

    def pairs(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[tuple[list[int], list[int]]]:
        """``pair(prompt, response)`` of many rows at once, with the same ids: one batch encoding (Rust,
        every core) of the distinct prompts and one of the responses or joined texts, and
        ``continuation_ids`` one by one only where a joined text's tokens do not start with its prompt's.
        What the dataset store (``stages.io.dataset_store``) keeps for every later stage. Raises
        ``TokenizationError`` as ``prompt_ids`` does."""
        keys = [(is_conversational(p), prompt_key(p)) for p in prompts]  # a string never equals a message list
        distinct = dict(zip(keys, prompts))
        templated = {key: self.templated(p) for key, p in distinct.items()}
        texts = [self._rendered(p) if templated[key] else p for key, p in distinct.items()]
        heads = dict(zip(distinct, self._ids_many(texts)))  # a plain prompt's own ids, or the rendering's
        chat = [i for i, key in enumerate(keys) if templated[key]]
        plain = [i for i, key in enumerate(keys) if not templated[key] and responses[i]]
        ids_of = dict(zip(chat, self._ids_many([responses[i] for i in chat])))
        for i, joined in zip(plain, self._ids_many([prompts[i] + responses[i] for i in plain])):  # type: ignore[operator]
            head = heads[keys[i]]
            continues = joined[: len(head)] == head and len(joined) > len(head)
            ids_of[i] = joined[len(head) :] if continues else self.continuation_ids(prompts[i], responses[i])  # type: ignore[arg-type]
        stops = set(self.stop_ids)
        rows = []
        for i, (prompt, key) in enumerate(zip(prompts, keys)):
            head = heads[key] if templated[key] else self._with_bos(heads[key])
            ids = ids_of.get(i, [])
            rows.append((list(head), ids if ids and ids[-1] in stops else ids + [self.stop_id(prompt)]))
        return rows

    @cached_property
    def fingerprint(self) -> str:
        """Digest of everything the ids depend on (16 hex chars): the tokenizer's vocabulary, merges and
        normalizer, its chat template (and today's date where the template writes it, as Llama 3.2's does),
        this contract's setting, BOS, EOS, end of turn and stop ids, the tokenizers and transformers
        versions, and this module's code. The dataset store keeps token ids under it."""
        import tokenizers
        import transformers

        template = getattr(self.tokenizer, "chat_template", None)
        settings = [
            self.chat_template,
            template,
            time.strftime("%Y-%m-%d") if template and "strftime_now" in str(template) else None,
            self.bos_id,
            self.eos_id,
            self.turn_end_id,
            list(self.stop_ids),
            getattr(self.tokenizer, "split_special_tokens", False),
            tokenizers.__version__,
            transformers.__version__,
        ]
        digest = hashlib.sha256(self._vocabulary().encode())
        digest.update(json.dumps(settings, default=str).encode())
        digest.update(Path(__file__).read_bytes())
        return digest.hexdigest()[:16]

    def _vocabulary(self) -> str:
        """The tokenizer's whole definition as text: the Rust backend's JSON without its padding and
        truncation (a pad token's setting leaves them on the shared backend), else the vocabulary."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        try:
            definition = json.loads(backend.to_str()) if backend is not None else None
        except Exception:  # a backend with Python components cannot be serialised
            definition = None
        if definition is None:
            return json.dumps(self.tokenizer.get_vocab(), sort_keys=True)
        definition.pop("padding", None)
        definition.pop("truncation", None)
        return json.dumps(definition, sort_keys=True)

    def batch(
        self,
        prompts: list[Prompt],
        responses: list[str],
        device: torch.device | str,
        finished: list[bool] | None = None,
    ) -> SequenceBatch:
        """A right-padded batch of (prompt, response) pairs on ``device`` (``stages.model.sequences.SequenceBatch``)."""
        finished = finished if finished is not None else [True] * len(prompts)
        rows = [self.pair(p, r, done) for p, r, done in zip(prompts, responses, finished, strict=True)]
        return from_token_ids(rows, self.pad_id, device)

    def text(self, response_ids: list[int] | tuple[int, ...]) -> str:
        """A response's text: its ids decoded, special tokens included (a sampled ``<|assistant|>7`` is not
        the answer ``7``), and no "clean-up" of spaces (it would strip the space before punctuation that
        the ids hold); the caller leaves out the end token."""
        return self.tokenizer.decode(list(response_ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def continuation_ids(self, prompt: str, response: str) -> list[int]:
        """The ids of ``response`` that continue the ids of the standard ``prompt``, so that their joined
        decoding is ``prompt + response`` (module docstring, "Boundary"), without touching the prompt's.

        In order: the tail of ``ids(prompt + response)`` where it starts with ``ids(prompt)`` (TRL's
        tokenization of the joined text); else, where the two merge across the boundary (``"Q: "`` +
        ``"Paris"``), the response's tokens after a newline, dropped again (a newline ends a SentencePiece
        word, so no ``▁`` is invented), if they decode right; else the response's own tokens.
        """
        if not response:
            return []
        head = self._ids(prompt)
        joined = self._ids(prompt + response)
        if joined[: len(head)] == head and len(joined) > len(head):
            return joined[len(head) :]
        newline = self._ids(_SENTINEL)
        after = self._ids(_SENTINEL + response)
        tail = after[len(newline) :]
        if after[: len(newline)] == newline and self.text(head + tail) == self.text(head) + response:
            return tail
        return self._ids(response)

    def _with_bos(self, ids: list[int]) -> list[int]:
        """A standard prompt's ids with BOS in front where the tokenizer adds one (and it is not there)."""
        return [self.bos_id] + ids if self.bos_id is not None and ids[:1] != [self.bos_id] else ids

    def _rendered(self, prompt: Prompt) -> str:
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as err:  # jinja2's raise_exception: not a ValueError, and a one-line user error here
            raise TokenizationError(f"the chat template refuses these messages ({err})") from None

    def _ids_many(self, texts: list[str]) -> list[list[int]]:
        """``_ids`` of each text, in one batch call of the Rust tokenizer (``_encoder``) where there is one."""
        if not texts:
            return []
        if self._encoder is None:
            encoded = self.tokenizer(texts, add_special_tokens=False).input_ids
        else:
            encoded = [e.ids for e in self._encoder.encode_batch(texts, add_special_tokens=False)]
        return [list(ids) if text else [] for text, ids in zip(texts, encoded)]

    @cached_property
    def _encoder(self) -> Any:
        """A private copy of a fast tokenizer's Rust backend with padding and truncation off, as
        transformers turns them off for each call of its own (the shared backend keeps a tokenizer.json's
        padding, which would pad a batch), without transformers' per-row conversion. None where the
        tokenizer's own call does more than the backend: a slow tokenizer, ``split_special_tokens``, a
        class with its own encoding (CodeLlama's infilling), a backend that cannot be serialised."""
        from transformers.tokenization_utils_tokenizers import TokenizersBackend

        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        own_encoding = type(self.tokenizer)._encode_plus is not TokenizersBackend._encode_plus
        if backend is None or own_encoding or getattr(self.tokenizer, "split_special_tokens", False):
            return None
        from tokenizers import Tokenizer

        try:
            encoder = Tokenizer.from_str(backend.to_str())
        except Exception:  # Python components: transformers' own call path, batch by batch
            return None
        encoder.no_padding()
        encoder.no_truncation()
        return encoder

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids) if text else []


def generation_end_ids(generation_config: Any) -> tuple[int, ...]:
    """The end ids of a model's ``transformers.GenerationConfig`` (its ``eos_token_id``: an int, a list or
    unset; none for a model without one)."""
    ids = getattr(generation_config, "eos_token_id", None)
    return () if ids is None else (ids,) if isinstance(ids, int) else tuple(ids)


def _added_bos(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """BOS's id if the tokenizer puts BOS in front of a text by itself, else None."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    with_special = tokenizer("a", add_special_tokens=True).input_ids
    without = tokenizer("a", add_special_tokens=False).input_ids
    return bos if with_special[:1] == [bos] and without[:1] != [bos] else None


def _turn_end(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that ends an assistant turn in the chat template: the first special token written after
    a probe response (``<|im_end|>`` after ChatML's content, even behind a newline); EOS for a template
    that writes none there. Raises ``TokenizationError`` for a template that cannot render an exchange."""
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": _PROBE_PROMPT},
        {"role": "assistant", "content": _PROBE_RESPONSE},
    ]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as err:  # a template that refuses the probe conversation: say so in one line
        raise TokenizationError(
            f"the tokenizer's chat template cannot render a user/assistant exchange ({err})"
        ) from None
    at = text.rfind(_PROBE_RESPONSE)
    after = text[at + len(_PROBE_RESPONSE) :] if at >= 0 else ""
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    ids = tokenizer(after, add_special_tokens=False).input_ids if after else []
    return next((i for i in ids if i in special), tokenizer.eos_token_id)
