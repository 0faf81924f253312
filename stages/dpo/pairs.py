"""DPO's preference pairs as the contract's ids, and the pairs truncation would make identical.

Torch-free (it needs only the tokenization contract), so the pre-flight check counts the pairs DPO
drops with the same code (``stages.tools.contract_check``) without loading TRL.
"""

from __future__ import annotations

import pyarrow as pa

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


def stored_pair_rows(tokens: pa.Table) -> list[dict[str, list[int]]]:
    """``tokenized_pairs``'s rows from the dataset store's token table of the preference pairs (its ids,
    tokenized once by the run's pre-flight: ``stages.io.dataset_store``)."""
    return [
        {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids}
        for prompt_ids, (chosen_ids, rejected_ids) in zip(
            tokens.column("prompt_ids").to_pylist(), tokens.column("response_ids").to_pylist(), strict=True
        )
    ]


def distinct_after_truncation(rows: list[dict[str, list[int]]], max_length: int) -> tuple[list[int], list[int]]:
    """(the indices of the pairs whose chosen and rejected still differ once DPOTrainer's collator keeps the
    first ``max_length`` ids of prompt + response, the record numbers (from 1) of those that do not), from
    the pairs' ``tokenized_pairs`` rows.

    A pair whose prompt fills the budget, or whose responses agree up to it, has a log-ratio margin of 0
    whatever the policy: loss ln 2, no gradient, and a wrong pair in ``reward_accuracy``. TRL drops the
    first kind in the dataset preparation this stage replaces (TRL #3382 / PR #3398); both go here."""
    kept, dropped = [], []
    for index, row in enumerate(rows):
        chosen, rejected = (row["prompt_ids"] + row[side][:max_length] for side in ("chosen_ids", "rejected_ids"))
        if chosen[:max_length] != rejected[:max_length]:
            kept.append(index)
        else:
            dropped.append(index + 1)
    return kept, dropped
