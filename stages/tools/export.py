"""``rlhf export``: hand a run's result to serving, as an adapter folder or as one standalone model.

Without ``--merge`` the export is the stage's PEFT adapter folder (and, for the reward model, its score
head), the tokenizer, and an ``export.json``/``README.md`` that name the exact base model: its name,
revision, the folder it was loaded from and the fingerprint of its weights.

With ``--merge`` the LoRA weights are merged into a copy of the base (PEFT's ``merge_and_unload``: the
"no extra inference latency" property of LoRA, Hu et al. 2021, section 4.1), saved with its tokenizer and
generation config, so ``AutoModelForCausalLM.from_pretrained(DIR)`` loads it with no PEFT at all:

* a QLoRA adapter is merged into the dequantised base (the nf4 weights it trained on, in
  ``backbone.dtype``), not into the original full-precision weights it never saw;
* the reward model becomes an ``AutoModelForSequenceClassification`` (``num_labels=1``) whose ``score``
  layer is the stage's score head;
* a P-tuning v2 prefix is not a weight delta and cannot be merged: the export says so and writes the
  adapter folder instead.

Every export is checked before it is published, by loading it back with plain transformers (and PEFT for
an adapter) in this process: a policy must reproduce the logits its stage saved
(``probe_logits.safetensors``), a reward model the scores of its stage's probe texts
(``probe_scores.json``). The folder is written beside ``--out`` and renamed into place when complete, so a
failed export leaves nothing a later command could mistake for one.

It runs in a process of its own (``python -m stages.tools.export``; ``rlhf export`` starts it with the
run's config): the CLI's process never imports torch.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from stages.io import artifacts
from stages.io.artifacts import ArtifactError
from stages.io.backbone_files import backbone_fingerprint, hub_commit
from stages.io.config import ConfigError, PipelineConfig, load_config
from stages.io.sections import needs_4bit
from stages.model.backbone import load_backbone, resolve_backbone
from stages.model.heads import SCORE_HEAD, load_head
from stages.model.probes import PROBE_FILE
from stages.model.reward_model import PROBES
from stages.model.tokenization import Tokenization, generation_end_ids

EXPORT_FILE = "export.json"
# How far an export's logits (or scores) may drift from what its stage computed. fp32: merging changes
# the order of the sums (1.1e-5 measured); QLoRA in fp32: dequantised nf4 weights in one matmul instead of
# bitsandbytes' kernel, against a stage's in-process result (3.1e-4); bf16: the merged weight W + BA is
# rounded to bf16 where the stage added a float32 LoRA branch (0.16 on the built-in probe texts, whose
# logits reach about 20; merging in float32 first measured the same). tests/test_export.py.
TOLERANCE = {"float32": 1e-4, "bfloat16": 0.25}
QLORA_TOLERANCE = 1e-3


class ExportError(RuntimeError):
    """An export that cannot be made or does not reproduce its stage; nothing was published."""


@dataclass(frozen=True)
class ExportPlan:
    """What ``export_run`` will write: the stage artifact it reads and how."""

    run_dir: Path
    stage: str
    artifact: Path
    cfg: PipelineConfig
    merge: bool

    @property
    def is_reward(self) -> bool:
        """A reward model: its artifact holds a score head (and the probe scores to check it with)."""
        return (self.artifact / SCORE_HEAD).is_file()


def plan_export(run_dir: Path, cfg: PipelineConfig, stage: str | None, merge: bool) -> ExportPlan:
    """Check the run (``run_dir``, whose config is ``cfg``) and its stage artifact before anything loads.

    ``stage`` defaults to the run's last stage. Raises ``ConfigError`` for a stage not in the run, or a
    stage whose artifact is not finished (``artifacts.verify`` names a changed file).
    """
    run_dir = Path(run_dir)
    stage = stage or cfg.run.stages[-1]
    if stage not in cfg.run.stages:
        raise ConfigError(f"--stage {stage}: not among run {run_dir.name}'s stages {cfg.run.stages}")
    artifact = run_dir / stage
    if not artifacts.is_finished(artifact):
        raise ConfigError(
            f"{artifact}: stage {stage} has no finished artifact in this run (see `rlhf report {run_dir.name}`)"
        )
    artifacts.verify(artifact, under="adapter")
    return ExportPlan(run_dir, stage, artifact, cfg, merge)


def export_run(plan: ExportPlan, out: Path) -> dict[str, Any]:
    """Write the export to ``out`` (which must not exist yet) and return what ``export.json`` records.

    Raises ``ConfigError`` when ``out`` exists, ``ExportError`` when the backbone is not the one the
    adapter was trained on or the export does not reproduce its stage.
    """
    out = Path(out)
    if out.exists():
        raise ConfigError(f"--out {out}: already exists; choose a new folder (an export is never overwritten)")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        record = _write(plan, staging)
        artifacts.write_json(staging / EXPORT_FILE, record)
        (staging / "README.md").write_text(_readme(record))
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return record


def _write(plan: ExportPlan, folder: Path) -> dict[str, Any]:
    cfg, manifest = plan.cfg, artifacts.read_manifest(plan.artifact)
    kind = cfg.adapter.kind
    quantized = kind == "qlora"
    if manifest["backbone_fingerprint"] != backbone_fingerprint(cfg.backbone, quantized):
        raise ExportError(
            f"{plan.artifact}: trained on backbone {manifest['backbone_fingerprint']}, but "
            f"{cfg.backbone.name} is now {backbone_fingerprint(cfg.backbone, quantized)}"
        )
    merged = plan.merge and kind != "ptuning_v2"
    notes: list[str] = []
    if plan.merge and not merged:
        notes.append(
            "adapter.kind=ptuning_v2 cannot be merged: a prefix is extra key/value states on every "
            "layer, not a weight delta; exported the adapter folder instead"
        )
        print(f"warning: {notes[-1]}", flush=True)
    if merged:
        _write_merged(plan, folder)
    else:
        _write_adapter(plan, folder)
    return {
        "run_id": plan.run_dir.name,
        "stage": plan.stage,
        "merged": merged,
        "format": ("sequence-classification" if plan.is_reward else "causal-lm") if merged else "peft-adapter",
        "base_model": {
            "name": cfg.backbone.name,
            "revision": cfg.backbone.revision,
            "commit": hub_commit(cfg.backbone),
            "location": resolve_backbone(cfg.backbone),
            "dtype": cfg.backbone.dtype,
            "fingerprint": manifest["backbone_fingerprint"],
        },
        "adapter_kind": kind,
        "cache_key": manifest["cache_key"],
        "metrics": manifest["metrics"],
        "notes": notes,
    }


def _write_adapter(plan: ExportPlan, folder: Path) -> None:
    shutil.copytree(plan.artifact / "adapter", folder / "adapter")
    if plan.is_reward:
        shutil.copy2(plan.artifact / SCORE_HEAD, folder / SCORE_HEAD)
    backbone = _load_base(plan)
    backbone.tokenizer.save_pretrained(folder / "tokenizer")
    _check_adapter_export(plan, folder, backbone)


def _load_base(plan: ExportPlan) -> Any:
    """The backbone on the CPU as the stage loaded it (4-bit for QLoRA)."""
    cpu = plan.cfg.backbone.model_copy(update={"device": "cpu"})
    return load_backbone(cpu, quantize_4bit=needs_4bit(plan.cfg.adapter.kind))


def _write_merged(plan: ExportPlan, folder: Path) -> None:
    """Merge the adapter into a (dequantised) base and save a plain transformers model."""
    backbone = _load_base(plan)
    base = backbone.model
    if plan.cfg.adapter.kind == "qlora":
        base = base.dequantize()  # the nf4 weights it trained on, as dense weights
        base.to(getattr(torch, plan.cfg.backbone.dtype))
    model = PeftModel.from_pretrained(base, str(plan.artifact / "adapter")).merge_and_unload()
    if plan.is_reward:
        model = _as_sequence_classifier(model, plan.artifact, backbone.tokenizer)
    else:
        _stop_where_the_stages_stop(model, backbone.tokenizer, plan.cfg)
    model.config.pad_token_id = backbone.tokenizer.pad_token_id
    model.save_pretrained(folder)
    backbone.tokenizer.save_pretrained(folder)
    _check_merged_export(plan, folder)


def _stop_where_the_stages_stop(model: Any, tokenizer: Any, cfg: PipelineConfig) -> None:
    """The generation config ends a response where the pipeline's generation did (``Tokenization.stop_ids``:
    EOS, a chat template's end of turn and the model's own end ids), and pads as the stages padded; else a
    chat model served with plain ``generate`` would talk on past its turn. Its other settings stay."""
    tokenization = Tokenization.of(tokenizer, cfg.data.chat_template, generation_end_ids(model.generation_config))
    stops = list(tokenization.stop_ids)
    model.generation_config.eos_token_id = stops[0] if len(stops) == 1 else stops
    model.generation_config.pad_token_id = tokenization.pad_id


def _as_sequence_classifier(causal: Any, artifact: Path, tokenizer: Any) -> Any:
    """The merged backbone under a ``score`` layer holding the reward head: transformers' sequence
    classification (``num_labels=1``), which scores the last token that is not padding, as the stage did
    (``stages.model.heads.sequence_scores``: the last real token). Its ``score`` has no bias; the head's
    is exactly 0 when trained on pairs alone (the pairwise loss is blind to a constant), else refused.
    Refused too when the tokenizer pads with its end token: transformers would then score the token
    before a response's end token, not the end token the stage scored."""
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ExportError(
            f"{artifact}: the tokenizer pads with its end token ({tokenizer.eos_token!r}), so "
            "transformers' sequence classification would score the token before each response's end "
            "token, not the end token the reward stage scored; export without --merge"
        )
    manifest = artifacts.read_manifest(artifact)
    head = load_head(artifact / SCORE_HEAD, causal.config.hidden_size, manifest["backbone_fingerprint"], "cpu")
    if head.bias.item() != 0.0:
        raise ExportError(
            f"{artifact / SCORE_HEAD}: the head has a bias ({head.bias.item():g}), which transformers' "
            "sequence-classification score layer cannot hold; export without --merge"
        )
    config = copy.deepcopy(causal.config)
    config.num_labels, config.architectures, config.tie_word_embeddings = 1, None, False
    classifier = AutoModelForSequenceClassification.from_config(config).to(causal.dtype)
    missing, unexpected = classifier.load_state_dict(causal.state_dict(), strict=False)
    if set(missing) != {"score.weight"} or any(not k.startswith("lm_head") for k in unexpected):
        raise ExportError(
            f"the merged backbone does not fit {type(classifier).__name__}: missing {missing}, unexpected {unexpected}"
        )
    with torch.no_grad():
        classifier.score.weight.copy_(head.weight.to(classifier.score.weight.dtype))
    return classifier


def _tolerance(plan: ExportPlan) -> float:
    fp32_qlora = plan.cfg.adapter.kind == "qlora" and plan.cfg.backbone.dtype == "float32"
    return QLORA_TOLERANCE if fp32_qlora else TOLERANCE[plan.cfg.backbone.dtype]


def _check_merged_export(plan: ExportPlan, folder: Path) -> None:
    """Load the export with plain transformers and compare it with what the stage recorded."""
    if plan.is_reward:
        model = AutoModelForSequenceClassification.from_pretrained(folder)
        _compare_scores(plan, lambda ids: model(input_ids=ids).logits[:, 0])
        return
    model = AutoModelForCausalLM.from_pretrained(folder)
    _compare_logits(plan, lambda batch: model(**batch).logits)


def _check_adapter_export(plan: ExportPlan, folder: Path, backbone: Any) -> None:
    """Load the exported adapter with plain PEFT on the base and compare it with the stage's record."""
    model = PeftModel.from_pretrained(backbone.model, str(folder / "adapter"))
    if plan.is_reward:
        fingerprint = artifacts.read_manifest(plan.artifact)["backbone_fingerprint"]
        head = load_head(folder / SCORE_HEAD, model.config.hidden_size, fingerprint, "cpu")
        _compare_scores(
            plan,
            lambda ids: head(
                model(input_ids=ids, output_hidden_states=True).hidden_states[-1][:, -1].to(head.weight.dtype)
            )[:, 0],
        )
        return
    _compare_logits(plan, lambda batch: model(**batch).logits)


def _compare_logits(plan: ExportPlan, logits_of: Any) -> None:
    probe = load_file(str(plan.artifact / PROBE_FILE))
    with torch.no_grad():
        found = logits_of({"input_ids": probe["input_ids"], "attention_mask": probe["attention_mask"]}).float()
    real = probe["attention_mask"].bool()
    drift = (found[real] - probe["logits"][real]).abs().max().item()
    if drift > _tolerance(plan):
        raise ExportError(
            f"the exported {plan.stage} policy's logits differ from its stage's by {drift:.3g} "
            f"(tolerance {_tolerance(plan):g}); nothing was published"
        )


def _compare_scores(plan: ExportPlan, score_of: Any) -> None:
    probes = json.loads((plan.artifact / PROBES).read_text())
    with torch.no_grad():  # one sequence at a time: no padding, so the last token is the last real token
        found = [score_of(torch.tensor([p["ids"]])).item() for p in probes]
    drift = max(abs(f - p["score"]) for f, p in zip(found, probes, strict=True))
    if drift > _tolerance(plan):
        raise ExportError(
            f"the exported reward model's scores differ from its stage's by {drift:.3g} "
            f"(tolerance {_tolerance(plan):g}); nothing was published"
        )


def _readme(record: dict[str, Any]) -> str:
    base = record["base_model"]
    if record["format"] == "causal-lm":
        load = 'from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained("{this folder}")'
    elif record["format"] == "sequence-classification":
        load = (
            "from transformers import AutoModelForSequenceClassification\n"
            'reward_model = AutoModelForSequenceClassification.from_pretrained("{this folder}")  # logits[:, 0]'
        )
    else:
        load = (
            "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n"
            f'base = AutoModelForCausalLM.from_pretrained("{base["location"]}", '
            f"revision={base['commit'] or base['revision']!r})\n"
            'model = PeftModel.from_pretrained(base, "{this folder}/adapter")'
        )
    notes = "".join(f"\n- {note}" for note in record["notes"])
    return (
        f"# {record['run_id']} / {record['stage']} ({record['format']})\n\n"
        f"Exported by `rlhf export` from run `{record['run_id']}`, stage `{record['stage']}` "
        f"(cache key `{record['cache_key']}`, adapter kind `{record['adapter_kind']}`).\n\n"
        f"Base model: `{base['name']}` at revision `{base['revision'] or 'main'}`"
        + (f" (commit `{base['commit']}`)" if base["commit"] else "")
        + ", loaded from "
        f"`{base['location']}` in `{base['dtype']}`; weights fingerprint `{base['fingerprint']}`.\n\n"
        f"```python\n{load}\n```\n"
        + (f"\nNotes:{notes}\n" if notes else "")
        + f"\nMetrics of the stage: `{json.dumps(record['metrics'], sort_keys=True)}`\n"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.tools.export", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--config", type=Path, required=True, help="the run's config")
    parser.add_argument("--stage")
    parser.add_argument("--merge", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        plan = plan_export(args.run_dir, load_config(args.config), args.stage, args.merge)
        record = export_run(plan, args.out)
    except (ConfigError, ArtifactError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    print(f"exported {record['run_id']}/{record['stage']} as {record['format']} to {args.out}")


if __name__ == "__main__":
    main()
