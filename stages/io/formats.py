"""The dataset formats each kind of data accepts (TRL's names), turned into one record shape per kind.

A prompt is *standard* (a string) or *conversational* (a list of ``{"role", "content"}`` messages ending
before the assistant's reply); responses are strings. Records, whatever the file's format:

    sft          {"prompt": Prompt, "completion": str}      ("" prompt: language modeling, loss on all of it)
    preferences  {"prompt": Prompt, "chosen": str, "rejected": str}  (+ "score_chosen", "score_rejected")
    eval         {"prompt": Prompt, "answer": str}
    prompts      {"prompt": Prompt}
    ranked       {"query": Prompt, "responses": [str, ...], "scores": [number, ...]}

The formats of each kind are listed in ``FORMATS`` with one example row each (the README shows them);
``to_record`` picks the first whose keys a row has and raises ``FormatError`` with what is wrong, which
``stages.io.data`` prefixes with the file and the line.

Implicit prompts (preferences with ``chosen``/``rejected`` only) are the longest shared prefix up to the
last assistant turn: for strings, the shared text up to and including the last ``Assistant:`` in it
(Anthropic HH), or else up to the last whitespace, which stays with the responses (where byte-level BPE
tokenizers put it); for message lists, the shared messages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

Message = dict[str, str]
Prompt = str | list[Message]
ROLES = ("system", "user", "assistant")
ASSISTANT_MARKER = "Assistant:"  # Anthropic HH: "\n\nHuman: ...\n\nAssistant: ..."


class FormatError(ValueError):
    """A row that fits no format of its kind, or breaks one; the message says which and why."""


@dataclass(frozen=True)
class Format:
    """One accepted row shape of a kind of data."""

    name: str  # TRL's name for it
    keys: tuple[str, ...]  # a row with these keys is read in this format
    example: str  # one row, for the README and for error messages


FORMATS: dict[str, tuple[Format, ...]] = {
    "sft": (
        Format("prompt-completion", ("prompt", "completion"), '{"prompt": "3+4=", "completion": "7"}'),
        Format(
            "language modeling (messages)",
            ("messages",),
            '{"messages": [{"role": "user", "content": "3+4="}, {"role": "assistant", "content": "7"}]}',
        ),
        Format("language modeling (text)", ("text",), '{"text": "3+4=7"}'),
    ),
    "preferences": (
        Format(
            "explicit prompt",
            ("prompt", "chosen", "rejected"),
            '{"prompt": "3+4=", "chosen": "7", "rejected": "7;1+1=2"}',
        ),
        Format(
            "implicit prompt",
            ("chosen", "rejected"),
            '{"chosen": "\\n\\nHuman: 3+4=\\n\\nAssistant: 7", "rejected": "\\n\\nHuman: 3+4=\\n\\nAssistant: 8"}',
        ),
    ),
    "eval": (Format("prompt-answer", ("prompt", "answer"), '{"prompt": "3+4=", "answer": "7"}'),),
    "prompts": (Format("prompt-only", ("prompt",), '{"prompt": [{"role": "user", "content": "3+4="}]}'),),
    "ranked": (
        Format(
            "ranked candidates",
            ("query", "responses", "scores"),
            '{"query": "3+4=", "responses": ["7", "7;1+1=2"], "scores": [1.0, 0.0]}',
        ),
    ),
}
SCORE_KEYS = ("score_chosen", "score_rejected")  # UltraFeedback-binarized's ratings, kept when present
# The record fields that hold responses (what follows the prompt), per kind.
RESPONSE_FIELDS = {"sft": ("completion",), "preferences": ("chosen", "rejected"), "eval": ("answer",), "prompts": ()}


def format_keys(kind: str) -> set[str]:
    """Every key some format of ``kind`` reads (what a column mapping may name)."""
    return {key for f in FORMATS[kind] for key in f.keys} | (set(SCORE_KEYS) if kind == "preferences" else set())


def to_record(row: Any, kind: str) -> dict[str, Any]:
    """The record of ``row`` in the first format of ``kind`` whose keys it has; ``FormatError`` otherwise.
    A key whose value is null counts as absent (Parquet and HF rows have every column of their table)."""
    formats = FORMATS[kind]
    if not isinstance(row, dict):
        raise FormatError(f"expected an object, got {type(row).__name__}; {_expected(kind)}")
    present = {key for key, value in row.items() if value is not None}
    chosen = next((f for f in formats if present.issuperset(f.keys)), None)
    if chosen is None:
        raise FormatError(f"fits no {kind} format; {_expected(kind)}; the row has keys {sorted(present)}")
    return _READERS[(kind, chosen.name)](row)


def _expected(kind: str) -> str:
    return "expected " + " or ".join(f"{f.name} {list(f.keys)}" for f in FORMATS[kind])


def is_conversational(prompt: Prompt) -> bool:
    """Whether a prompt is a message list (which goes through the chat template) rather than a string."""
    return isinstance(prompt, list)


def prompt_key(prompt: Prompt) -> str:
    """A sortable, hashable identity of a prompt (equal prompts, equal keys)."""
    import json

    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def prompt_text(prompt: Prompt) -> str:
    """The prompt's words without a template (token-count estimates, hashing, logs)."""
    return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)


# Readers, one per (kind, format).


def _prompt_completion(row: dict[str, Any]) -> dict[str, Any]:
    prompt = _prompt(row["prompt"], "prompt")
    prompt, (completion,) = _responses(prompt, [row["completion"]], ["completion"])
    return {"prompt": prompt, "completion": completion}


def _messages(row: dict[str, Any]) -> dict[str, Any]:
    messages = _message_list(row["messages"], "messages")
    if messages[-1]["role"] != "assistant" or len(messages) < 2:
        raise FormatError(
            "'messages' must end with an assistant message after at least one other message "
            "(SFT trains on the last assistant turn; the messages before it are the prompt)"
        )
    return {"prompt": _prompt(messages[:-1], "messages"), "completion": messages[-1]["content"]}


def _text(row: dict[str, Any]) -> dict[str, Any]:
    return {"prompt": "", "completion": _string(row["text"], "text")}


def _explicit_preference(row: dict[str, Any]) -> dict[str, Any]:
    prompt = _prompt(row["prompt"], "prompt")
    prompt, (chosen, rejected) = _responses(prompt, [row["chosen"], row["rejected"]], ["chosen", "rejected"])
    return _preference(prompt, chosen, rejected, row)


def _implicit_preference(row: dict[str, Any]) -> dict[str, Any]:
    prompt: Prompt
    chosen, rejected = row["chosen"], row["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str):
        if chosen.strip() == rejected.strip():
            raise FormatError("'chosen' and 'rejected' are the same text, so the pair teaches nothing")
        prompt, chosen, rejected = _split_shared_text(_string(chosen, "chosen"), _string(rejected, "rejected"))
    elif isinstance(chosen, list) and isinstance(rejected, list):
        chosen_turns, rejected_turns = _message_list(chosen, "chosen"), _message_list(rejected, "rejected")
        if chosen_turns == rejected_turns:
            raise FormatError("'chosen' and 'rejected' are the same messages, so the pair teaches nothing")
        shared = 0
        while shared < min(len(chosen_turns), len(rejected_turns)) and chosen_turns[shared] == rejected_turns[shared]:
            shared += 1
        if shared == 0:
            raise FormatError("'chosen' and 'rejected' share no first message, so there is no implicit prompt")
        prompt, (chosen, rejected) = _responses(
            _prompt(chosen_turns[:shared], "chosen"), [chosen_turns, rejected_turns], ["chosen", "rejected"]
        )
    else:
        raise FormatError("'chosen' and 'rejected' must both be strings or both be message lists")
    return _preference(prompt, chosen, rejected, row)


def _preference(prompt: Prompt, chosen: str, rejected: str, row: dict[str, Any]) -> dict[str, Any]:
    if chosen.strip() == rejected.strip():
        raise FormatError("'chosen' and 'rejected' are the same text, so the pair teaches nothing")
    record: dict[str, Any] = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    for key in SCORE_KEYS:
        if row.get(key) is not None:
            record[key] = _number(row[key], key)
    return record


def _eval(row: dict[str, Any]) -> dict[str, Any]:
    return {"prompt": _prompt(row["prompt"], "prompt"), "answer": _string(row["answer"], "answer")}


def _prompt_only(row: dict[str, Any]) -> dict[str, Any]:
    return {"prompt": _prompt(row["prompt"], "prompt")}


def _ranked(row: dict[str, Any]) -> dict[str, Any]:
    responses, scores = row["responses"], row["scores"]
    if not isinstance(responses, list) or not responses or not all(_non_empty(r) for r in responses):
        raise FormatError("'responses' must be a non-empty list of non-empty strings")
    if not isinstance(scores, list):
        raise FormatError("'scores' must be a list of numbers")
    if len(scores) != len(responses):
        raise FormatError(f"'scores' has {len(scores)} entries but 'responses' has {len(responses)}")
    return {
        "query": _prompt(row["query"], "query"),
        "responses": list(responses),
        "scores": [_number(s, "scores") for s in scores],
    }


_READERS = {
    ("sft", "prompt-completion"): _prompt_completion,
    ("sft", "language modeling (messages)"): _messages,
    ("sft", "language modeling (text)"): _text,
    ("preferences", "explicit prompt"): _explicit_preference,
    ("preferences", "implicit prompt"): _implicit_preference,
    ("eval", "prompt-answer"): _eval,
    ("prompts", "prompt-only"): _prompt_only,
    ("ranked", "ranked candidates"): _ranked,
}


# Field checks.


def _non_empty(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _string(value: Any, field: str) -> str:
    if not _non_empty(value):
        raise FormatError(f"{field!r} must be a non-empty string, got {value!r}")
    return value


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FormatError(f"{field!r} must hold finite numbers, got {value!r}")
    return value


def _message_list(value: Any, field: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise FormatError(f"{field!r} must be a non-empty list of messages, got {value!r}")
    messages = []
    for n, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in ROLES or not _non_empty(message.get("content")):
            raise FormatError(
                f'{field!r} message {n}: expected {{"role": one of {list(ROLES)}, "content": '
                f"a non-empty string}}, got {message!r}"
            )
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def _prompt(value: Any, field: str) -> Prompt:
    if isinstance(value, str):
        return _string(value, field)
    messages = _message_list(value, field)
    if messages[-1]["role"] == "assistant":
        raise FormatError(f"{field!r} ends with an assistant message; a prompt ends before the assistant's reply")
    return messages


def _responses(prompt: Prompt, values: list[Any], fields: list[str]) -> tuple[Prompt, list[str]]:
    """Responses as strings. Conversational ones (a list holding the assistant's message, after the prompt's
    messages as UltraFeedback repeats them) make a standard prompt conversational: one user message."""
    if not any(isinstance(v, list) for v in values):
        return prompt, [_string(v, f) for v, f in zip(values, fields)]
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    texts = []
    for value, field in zip(values, fields):
        turns = _message_list(value, field)
        if turns[: len(messages)] == messages:
            turns = turns[len(messages) :]
        if len(turns) != 1 or turns[0]["role"] != "assistant":
            raise FormatError(f"{field!r} must hold exactly one assistant message after the prompt's messages")
        texts.append(turns[0]["content"])
    return messages, texts


def _split_shared_text(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) of an implicit-prompt pair of strings (module docstring)."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    prefix = chosen[:shared]
    marker = prefix.rfind(ASSISTANT_MARKER)
    if marker >= 0:
        cut = marker + len(ASSISTANT_MARKER)
    else:
        cut = max((i for i, ch in enumerate(prefix) if ch.isspace()), default=0)
    prompt = chosen[:cut].rstrip()
    if not prompt.strip():
        raise FormatError("'chosen' and 'rejected' share no prompt (no common text before their first difference)")
    cut = len(prompt)
    if not chosen[cut:].strip() or not rejected[cut:].strip():
        raise FormatError("after their shared prompt, 'chosen' or 'rejected' has no response text")
    return prompt, chosen[cut:], rejected[cut:]
