"""Write the example datasets in examples/data/ from the built-in addition task (deterministic).

    python examples/make_data.py          # rewrite them
    python examples/make_data.py --check  # exit 1 if a shipped file differs from what this writes

Two sets:

* ``examples/data/<kind>-<format>.jsonl``: five rows in each accepted format (README "Data formats");
* ``examples/data/chat/``: the built-in task in conversational form, full size, which
  ``configs/chat.yaml`` runs through the whole chain with the chat-template tokenizer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from stages.io import arithmetic
from stages.io.config import TaskSection

HERE = Path(__file__).resolve().parent / "data"
SMALL = 5


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def datasets(task: TaskSection = TaskSection()) -> dict[str, list[dict[str, Any]]]:
    """File name (under examples/data/) -> rows."""
    sft, pairs = arithmetic.sft_records(task), arithmetic.preference_records(task)
    evals, prompts, ranked = (
        arithmetic.eval_records(task),
        arithmetic.prompt_records(task),
        arithmetic.ranked_records(task),
    )
    few_sft, few_pairs = sft[:SMALL], pairs[:SMALL]
    return {
        "sft-prompt-completion.jsonl": few_sft,
        "sft-prompt-completion-conversational.jsonl": [
            {"prompt": _user(r["prompt"]), "completion": _assistant(r["completion"])} for r in few_sft
        ],
        "sft-messages.jsonl": [{"messages": _user(r["prompt"]) + _assistant(r["completion"])} for r in few_sft],
        "sft-text.jsonl": [{"text": r["prompt"] + r["completion"]} for r in few_sft],
        "preferences-explicit.jsonl": few_pairs,
        "preferences-implicit-hh.jsonl": [
            {
                "chosen": f"\n\nHuman: {r['prompt']}\n\nAssistant: {r['chosen']}",
                "rejected": f"\n\nHuman: {r['prompt']}\n\nAssistant: {r['rejected']}",
            }
            for r in few_pairs
        ],
        "preferences-implicit-conversational.jsonl": [
            {
                "chosen": _user(r["prompt"]) + _assistant(r["chosen"]),
                "rejected": _user(r["prompt"]) + _assistant(r["rejected"]),
            }
            for r in few_pairs
        ],
        "preferences-ultrafeedback.jsonl": [_ultrafeedback(r) for r in few_pairs],
        "preferences-renamed-columns.jsonl": [
            {"question": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in few_pairs
        ],
        "prompts.jsonl": prompts[:SMALL],
        "prompts-conversational.jsonl": [{"prompt": _user(r["prompt"])} for r in prompts[:SMALL]],
        "eval.jsonl": evals[:SMALL],
        "eval-conversational.jsonl": [{"prompt": _user(r["prompt"]), "answer": r["answer"]} for r in evals[:SMALL]],
        "ranked.jsonl": ranked[:SMALL],
        # The whole built-in task, conversational (configs/chat.yaml).
        "chat/sft.jsonl": [{"messages": _user(r["prompt"]) + _assistant(r["completion"])} for r in sft],
        "chat/preferences.jsonl": [_ultrafeedback(r) for r in pairs],
        "chat/prompts.jsonl": [{"prompt": _user(r["prompt"])} for r in prompts],
        "chat/eval.jsonl": [{"prompt": _user(r["prompt"]), "answer": r["answer"]} for r in evals],
    }


def _ultrafeedback(pair: dict[str, str]) -> dict[str, Any]:
    """UltraFeedback-binarized's shape: the prompt, and message lists that repeat it, with ratings."""
    return {
        "prompt": pair["prompt"],
        "chosen": _user(pair["prompt"]) + _assistant(pair["chosen"]),
        "rejected": _user(pair["prompt"]) + _assistant(pair["rejected"]),
        "score_chosen": 9.0,
        "score_rejected": 3.0,
    }


def render(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    stale = []
    for name, rows in datasets().items():
        path = HERE / name
        if args.check:
            if not path.is_file() or path.read_text() != render(rows):
                stale.append(name)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(render(rows))
    if stale:
        print(f"stale example data (run python examples/make_data.py): {stale}", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
