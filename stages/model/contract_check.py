"""The pre-flight check of the tokenization contract on the configured data, before any run folder exists.

With the backbone's real tokenizer (no weights loaded) and the contract every stage uses
(``stages.model.tokenization``):

* **Rendering.** Every distinct prompt shape of every dataset the run's stages read (a conversation's
  sequence of roles, or plain text under ``data.chat_template: always``) goes through the chat template
  once. A template that refuses one (Mistral v0.1's has no system role) is a ``DataError`` naming the
  file, the line and the template's own complaint, instead of a failure minutes into the run.
* **Budgets.** Per stage, how many rows its token budgets cut or drop, counted with the exact ids the
  stage trains on (templates add tens of ids: Llama 3.1's date header makes ``3+4=`` 44 ids): SFT's
  ``sft.max_length``, the context for the reward model and DPO (with DPO's pairs that truncation makes
  identical, ``stages.dpo.distinct_after_truncation``), and the context against a rollout prompt plus
  the stage's ``max_new_tokens``. A dataset of more than ``SAMPLE_ROWS`` rows is counted on an even
  sample of them and the counts are scaled (said as "about").

It runs in a process of its own (``python -m stages.model.contract_check``), because the tokenizer needs
transformers and the CLI's process never imports torch: ``rlhf run``/``stage``/``resume``/``sweep`` call it
in pre-flight, ``rlhf plan`` prints its lines. Exit status 2 with ``error: ...`` on a refusal.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from stages.io.artifacts import ArtifactError
from stages.io.config import PipelineConfig, load_config
from stages.io.data import DataError, DataKind, Record, load_records, load_rollout_prompts, record_location, source_name
from stages.io.formats import is_conversational
from stages.io.provenance import stage_datasets
from stages.registry import spec

if TYPE_CHECKING:
    from stages.model.tokenization import Tokenization

SAMPLE_ROWS = 5000  # rows tokenized per dataset for the budget counts (all of them up to this many)
MOST = 0.5  # a stage that cuts more than this share of its rows' responses is warned about loudly


@dataclass(frozen=True)
class BudgetCount:
    """What one stage's budget does to one dataset's rows."""

    stage: str
    dataset: str  # the file (or builtin) and its kind
    budget: str  # the setting and its value, e.g. "sft.max_length=64"
    rows: int
    cut: int  # rows longer than the budget: their end is cut (an SFT demo loses its end token)
    dropped: int  # rows the stage leaves out (no room for a response; DPO pairs made identical)
    estimated: bool  # counted on a sample of SAMPLE_ROWS rows

    def line(self) -> str:
        about = "about " if self.estimated else ""
        text = (f"{self.stage}: {self.dataset}: {about}{self.cut} of {self.rows} rows over {self.budget}"
                f"{' (cut)' if self.cut else ''}, {about}{self.dropped} dropped")
        return f"WARNING: {text}: most responses are cut; raise {self.budget.split('=')[0]}" if self.mostly_cut else text

    @property
    def mostly_cut(self) -> bool:
        return self.rows > 0 and self.cut > MOST * self.rows


def contract_tokenization(cfg: PipelineConfig) -> tuple["Tokenization", int]:
    """The stages' ``Tokenization`` of the configured backbone, and its context length, from its files
    (tokenizer, ``generation_config.json``, ``config.json``) without loading the weights."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from stages.model.backbone import resolve_backbone
    from stages.model.tokenization import Tokenization, generation_end_ids

    location = resolve_backbone(cfg.backbone)
    options = {"revision": cfg.backbone.revision, "trust_remote_code": cfg.backbone.trust_remote_code}
    tokenizer = AutoTokenizer.from_pretrained(location, **options)
    try:
        generation = GenerationConfig.from_pretrained(location, revision=cfg.backbone.revision)
    except OSError:  # a model without generation_config.json
        generation = None
    context = AutoConfig.from_pretrained(location, **options).max_position_embeddings
    return Tokenization.of(tokenizer, cfg.data.chat_template, generation_end_ids(generation)), context


def check_rendering(cfg: PipelineConfig, tokenization: "Tokenization") -> None:
    """Render one prompt of every distinct shape of every dataset the run reads; raises ``DataError``
    naming the file, the line, the shape and the template's complaint for one it refuses."""
    from stages.model.tokenization import TokenizationError

    kinds = sorted({kind for stage in cfg.run.stages for kind in stage_datasets(stage, cfg)})
    for kind in kinds:
        ref = getattr(cfg.data, kind)
        seen: set[tuple[str, ...]] = set()
        for index, record in enumerate(load_records(ref, kind, cfg.task)):
            prompt = record.get("prompt", record.get("query"))
            shape = tuple(m["role"] for m in prompt) if is_conversational(prompt) else ("text",)
            if shape in seen:
                continue
            seen.add(shape)
            try:
                tokenization.prompt_ids(prompt)
            except TokenizationError as err:
                where = record_location(ref, kind, cfg.task, index)
                roles = f"roles {list(shape)}" if shape != ("text",) else "a plain-text prompt"
                raise DataError(f"{source_name(ref)}: {where}: a prompt with {roles}: {err} (backbone.name="
                                f"{cfg.backbone.name})") from None


def budget_counts(cfg: PipelineConfig, tokenization: "Tokenization", context: int) -> list[BudgetCount]:
    """``BudgetCount`` of every configured stage's token budgets on its datasets (module docstring)."""
    counts = []
    for stage in cfg.run.stages:
        datasets, rolls_out = spec(stage).datasets, "prompts" in spec(stage).optional_datasets
        if rolls_out and not (stage == "rrhf" and cfg.data.ranked):
            new = getattr(cfg, stage).max_new_tokens
            prompts = [{"prompt": p} for p in load_rollout_prompts(cfg.data, cfg.task)]
            counts.append(_count(stage, cfg, "prompts", tokenization, f"the context={context} - {stage}.max_new_tokens="
                                 f"{new}", context - new, records=prompts))
        elif "sft" in datasets and not rolls_out:
            counts.append(_count(stage, cfg, "sft", tokenization, f"sft.max_length={cfg.sft.max_length}",
                                 cfg.sft.max_length))
        elif "preferences" in datasets:
            counts.append(_count(stage, cfg, "preferences", tokenization, f"the context={context}", context,
                                 dpo_pairs=stage == "dpo"))
    return counts


def _count(stage: str, cfg: PipelineConfig, kind: DataKind, tokenization: "Tokenization", budget: str, limit: int,
           records: list[Record] | None = None, dpo_pairs: bool = False) -> BudgetCount:
    from stages.io.data import measure_lengths

    ref = (cfg.data.prompts or cfg.data.sft) if kind == "prompts" else getattr(cfg.data, kind)
    rows = records if records is not None else load_records(ref, kind, cfg.task)
    sample = rows if len(rows) <= SAMPLE_ROWS else rows[:: len(rows) // SAMPLE_ROWS][:SAMPLE_ROWS]
    lengths = measure_lengths(sample, kind, source_name(ref), tokenization, max(limit, 1))
    cut, dropped = len(lengths.too_long), len(lengths.no_room)
    if dpo_pairs:
        from stages.dpo import distinct_after_truncation

        dropped = len(distinct_after_truncation(sample, tokenization, limit)[1])
    scale = len(rows) / max(len(sample), 1)
    return BudgetCount(stage, f"{source_name(ref)} ({kind})", budget, len(rows), round(cut * scale),
                       round(dropped * scale), len(sample) < len(rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.model.contract_check", description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--json", action="store_true", help="print the budget counts as JSON")
    args = parser.parse_args(argv)
    from stages.model.tokenization import TokenizationError

    try:
        cfg = load_config(args.config, [])
        tokenization, context = contract_tokenization(cfg)
        check_rendering(cfg, tokenization)
        counts = budget_counts(cfg, tokenization, context)
    except (DataError, TokenizationError, ArtifactError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:  # hub and file errors span several lines; the first says what went wrong
        print(f"error: backbone.name={cfg.backbone.name!r}: cannot read its tokenizer or config "
              f"({str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__})", file=sys.stderr)
        sys.exit(2)
    if args.json:
        print(json.dumps([asdict(c) | {"line": c.line(), "mostly_cut": c.mostly_cut} for c in counts]))
    else:
        for count in counts:
            print(count.line())


def start_check(cfg: PipelineConfig) -> Callable[[], list[dict[str, Any]]]:
    """Start this check in a process of its own (the CLI's process never imports torch) and return the
    function that waits for it: it returns the budget counts (``BudgetCount`` fields and ``line``) or
    raises ``DataError`` with the check's one-line refusal."""
    import subprocess
    import tempfile

    folder = tempfile.TemporaryDirectory(prefix="rlhf-contract-")
    config = Path(folder.name) / "config.yaml"
    config.write_text(cfg.to_yaml())
    process = subprocess.Popen([sys.executable, "-m", "stages.model.contract_check", "--config", str(config), "--json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait() -> list[dict[str, Any]]:
        out, err = process.communicate()
        folder.cleanup()
        if process.returncode != 0:
            lines = [line for line in err.splitlines() if line.startswith("error: ")]
            raise DataError(lines[-1].removeprefix("error: ") if lines else f"the tokenization check failed:\n{err}")
        return json.loads(out.strip().splitlines()[-1])

    return wait


if __name__ == "__main__":
    main()
