"""DPO's preference pairs as the contract's ids, and the pairs truncation would make identical.

Torch-free (it needs only the tokenization contract), so the pre-flight check counts the pairs DPO
drops with the same code (``stages.tools.contract_check``) without loading TRL.
"""

from __future__ import annotations

from stages.io.data import Record
from stages.model.tokenization import Tokenization


def tokenized_pairs(pairs: list[Record], tokenization: Tokenization) -> list[dict[str, list[int]]]:
    """Preference pairs as DPOTrainer's processed rows: the contract's ``prompt_ids`` and the ``chosen_ids``
    and ``rejected_ids`` of each response, with its end token (``Tokenization.response_ids``), encoded in
    batches (``Tokenization.pairs``)."""
    prompts = [p["prompt"] for p in pairs]
    encoded = tokenization.pairs(prompts + prompts, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs])
    return [
        {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected[1]}
        for (prompt_ids, chosen_ids), rejected in zip(encoded[: len(pairs)], encoded[len(pairs) :])
    ]


def distinct_after_truncation(
    pairs: list[Record], tokenization: Tokenization, max_length: int
) -> tuple[list[Record], list[int]]:
    """(the pairs whose chosen and rejected still differ once DPOTrainer's collator keeps the first
    ``max_length`` ids of prompt + response, the record numbers (from 1) of those that do not).

    A pair whose prompt fills the budget, or whose responses agree up to it, has a log-ratio margin of 0
    whatever the policy: loss ln 2, no gradient, and a wrong pair in ``reward_accuracy``. TRL drops the
    first kind in the dataset preparation this stage replaces (TRL #3382 / PR #3398); both go here."""
    kept, dropped = [], []
    for number, (pair, row) in enumerate(zip(pairs, tokenized_pairs(pairs, tokenization), strict=True), start=1):
        chosen, rejected = (row["prompt_ids"] + row[side][:max_length] for side in ("chosen_ids", "rejected_ids"))
        if chosen[:max_length] != rejected[:max_length]:
            kept.append(pair)
        else:
            dropped.append(number)
    return kept, dropped
