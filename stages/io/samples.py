"""What the model says: bounded tables of held-out prompts and the responses a stage's policy samples.

Every practitioner reads samples first: reward hacking, rambling and a broken template show there long
before a curve moves (TRL logs completion tables for the same reason). Each stage that generates keeps
one table, ``samples.jsonl`` in its artifact (one JSON object per line), and the same rows go to W&B
(``stages.training.tracking``) and ``report.html``.

A row is one held-out prompt at one moment of training:

* ``phase``: ``step`` (after a logged training step), ``final`` (the final evaluation) or ``before``
  (SFT's base model, before training); ``step``: the stage's step (update for PPO) it was sampled after;
* ``prompt`` (a conversation as ``role: content`` lines), ``response`` (the text before its end token),
  ``finished`` (it emitted an end token within ``eval.max_new_tokens``), ``answer`` and ``correct``
  (the checker's verdict on the held-out answer, the rule of ``task_score``);
* ``reward`` (what the stage optimises, ``stages.training.rewards``), with its parts ``reward_model`` and
  ``checker`` where the stage's reward has them (None otherwise);
* ``reference_response`` / ``reference_finished``: at the final evaluation of a stage trained against a
  reference, the reference adapter's (SFT's) response to the same prompt from the same random stream, so a
  difference is the training's, not the dice's.

The first ``eval.samples`` held-out prompts are sampled every ``eval.samples_every`` logged steps, always
at temperature ``eval.temperature`` from the seed of the final evaluation: the same prompts and the same
random stream at every step, so a table shows one prompt's answer change as training goes on.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from stages.io.arithmetic import check
from stages.io.formats import Prompt

if TYPE_CHECKING:
    from stages.io.data import Record


class Sampled(Protocol):
    """What a row reads of a sampled response (``stages.model.sequences.Response`` has it): this floor
    names no class of the floors above it."""

    @property
    def text(self) -> str: ...

    @property
    def finished(self) -> bool: ...


SAMPLES_FILE = "samples.jsonl"
REWARD_PARTS = ("reward", "reward_model", "checker")  # RewardSource.parts: the total, then its sources
Row = dict[str, Any]
COLUMNS = (
    "phase",
    "step",
    "prompt",
    "response",
    "finished",
    "answer",
    "correct",
    "reward",
    "reward_model",
    "checker",
    "reference_response",
    "reference_finished",
)


def display_prompt(prompt: Prompt) -> str:
    """A prompt as a person reads it: the text, or a conversation as ``role: content`` lines."""
    return prompt if isinstance(prompt, str) else "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def sample_rows(
    phase: str,
    step: int,
    records: list[Record],
    responses: Sequence[Sampled],
    rewards: dict[str, list[float]] | None = None,
    references: Sequence[Sampled] | None = None,
) -> list[Row]:
    """One row per (held-out record, response), in order (the shorter of the two lists).

    ``rewards``: ``RewardSource.parts`` of these responses (``reward``, and ``reward_model`` / ``checker``
    where the source has them); ``references``: the reference adapter's responses to the same records.
    """
    rows = []
    for i, (record, response) in enumerate(zip(records, responses, strict=False)):
        answer = record.get("answer")
        reference = references[i] if references is not None else None
        rows.append(
            {
                "phase": phase,
                "step": step,
                "prompt": display_prompt(record["prompt"]),
                "response": response.text,
                "finished": response.finished,
                "answer": answer,
                "correct": bool(response.finished and check(response.text, answer)) if answer is not None else None,
                **{part: _part(rewards, part, i) for part in REWARD_PARTS},
                "reference_response": reference.text if reference is not None else None,
                "reference_finished": reference.finished if reference is not None else None,
            }
        )
    return rows


def _part(rewards: dict[str, list[float]] | None, name: str, index: int) -> float | None:
    values = (rewards or {}).get(name)
    return round(values[index], 5) if values is not None else None


def write_samples(out: Path, rows: list[Row]) -> Path:
    """``out/samples.jsonl``: the rows, one JSON object per line, in the order they were sampled."""
    path = Path(out) / SAMPLES_FILE
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def read_samples(artifact: Path) -> list[Row]:
    """A stage artifact's sample rows (empty for a stage that samples nothing, or an artifact from before
    samples were kept)."""
    path = Path(artifact) / SAMPLES_FILE
    if not path.is_file():
        return []
    # "\n" only: a response may hold U+2028 or U+0085, which str.splitlines() also splits on
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
