"""``rlhf inspect``: what each stage trains on, token by token, for one row of each configured dataset.

The tool to reach for when a new model misbehaves: for a row of every dataset the run's stages read, the
exact ids of the tokenization contract (``stages.model.tokenization``), each shown as ``id:token``, with
where the prompt ends, which ids the loss applies to, where a budget cuts, and which ids end a response
(where generation stops). It loads the tokenizer, not the weights, in a process of its own
(``python -m stages.tools.explain``), like the pre-flight check (``stages.tools.contract_check``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from stages.io.config import PipelineConfig, load_config
from stages.io.data import DataError, load_records, load_rollout_prompts, record_location, source_name
from stages.io.formats import Prompt
from stages.io.provenance import stage_datasets
from stages.tools.contract_check import contract_tokenization, one_line_errors, rolls_out

if TYPE_CHECKING:
    from stages.model.tokenization import Tokenization


def marked(tokenization: Tokenization, ids: list[int]) -> str:
    """``ids`` as ``id:token`` pieces (the token as the tokenizer spells it: ``▁7``, ``Ġthe``; a character
    that does not print, such as a raw newline, escaped), space-separated."""
    tokens = tokenization.tokenizer.convert_ids_to_tokens(ids)
    return " ".join(f"{i}:{_printable(str(t))}" for i, t in zip(ids, tokens))


def _printable(token: str) -> str:
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in token)


def _pair_lines(tokenization: Tokenization, prompt: Prompt, response: str, label: str, budget: int) -> list[str]:
    prompt_ids, response_ids = tokenization.pair(prompt, response)
    total = len(prompt_ids) + len(response_ids)
    cut = f"; CUT at {budget}: the last {total - budget} ids are not trained on" if total > budget else ""
    return [
        f"  prompt ({len(prompt_ids)} ids, no loss): {marked(tokenization, prompt_ids)}",
        f"  {label} ({len(response_ids)} ids, loss): {marked(tokenization, response_ids)}{cut}",
        f"  decoded: {tokenization.text(prompt_ids + response_ids)!r}",
    ]


def explain(cfg: PipelineConfig, tokenization: Tokenization, context: int, row: int = 0) -> list[str]:
    """The lines of ``rlhf inspect`` for record ``row`` (from 0) of each dataset of each configured stage.
    Raises ``DataError`` for a row a dataset does not hold."""
    if row < 0:
        raise DataError(f"--row {row + 1}: rows count from 1")
    stops = ", ".join(marked(tokenization, [i]) for i in tokenization.stop_ids)
    lines = [
        f"backbone {cfg.backbone.name}: BOS added to plain prompts: {tokenization.bos_id is not None}; "
        f"pad {marked(tokenization, [tokenization.pad_id])}; a response ends at the first of: {stops}"
    ]
    for stage in cfg.run.stages:
        for kind in stage_datasets(stage, cfg):
            if (kind == "eval" and stage != cfg.run.stages[0]) or (kind == "sft" and stage != "sft"):
                continue  # every stage evaluates on the same rows (shown once); the RL stages read only SFT's prompts
            ref = getattr(cfg.data, kind)
            records = load_records(ref, kind, cfg.task)
            if row >= len(records):
                raise DataError(f"{source_name(ref)}: --row {row + 1}, but it holds {len(records)} records")
            record = records[row]
            where = f"{source_name(ref)} {record_location(ref, row, kind, cfg.task)}"
            if kind == "sft":
                lines += [
                    f"{stage} trains on {where} (sft.max_length={cfg.sft.max_length}):",
                    *_pair_lines(
                        tokenization, record["prompt"], record["completion"], "completion", cfg.sft.max_length
                    ),
                ]
            elif kind == "preferences":
                lines.append(
                    f"{stage} trains on {where} (context {context}; "
                    f"{'the reward head reads the last id' if stage == 'reward' else 'log-ratio of each response'}):"
                )
                for side in ("chosen", "rejected"):
                    lines += _pair_lines(tokenization, record["prompt"], record[side], side, context)
            elif kind == "eval":
                prompt_ids = tokenization.prompt_ids(record["prompt"])
                lines += [
                    f"evaluation samples from {where} (eval.max_new_tokens={cfg.eval.max_new_tokens}; the "
                    f"answer {record['answer']!r} must match the response up to its end id):",
                    f"  prompt ({len(prompt_ids)} ids): {marked(tokenization, prompt_ids)}",
                ]
            elif kind == "ranked":
                lines.append(f"{stage} ranks the candidates of {where}:")
                for response in record["responses"]:
                    lines += _pair_lines(tokenization, record["query"], response, "candidate", context)
        if rolls_out(stage, cfg):
            prompts = load_rollout_prompts(cfg.data, cfg.task)
            if row >= len(prompts):
                raise DataError(
                    f"{stage}'s rollout prompts: --row {row + 1}, but there are {len(prompts)} distinct ones"
                )
            prompt = prompts[row]
            prompt_ids = tokenization.prompt_ids(prompt)
            new = getattr(cfg, stage).max_new_tokens
            lines += [
                f"{stage} rolls out on its prompts ({source_name(cfg.data.prompts or cfg.data.sft)}, distinct prompt "
                f"{row + 1}; {stage}.max_new_tokens={new}, context {context}):",
                f"  prompt ({len(prompt_ids)} ids, no loss): {marked(tokenization, prompt_ids)}",
                f"  then up to {new} sampled ids (loss), ending at the first of: {stops}",
            ]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.tools.explain", description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--row", type=int, default=1, help="the record to show, from 1 (rlhf inspect checks it)")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, [])
    with one_line_errors(cfg):
        tokenization, context = contract_tokenization(cfg)
        print("\n".join(explain(cfg, tokenization, context, args.row - 1)))


if __name__ == "__main__":
    main()
