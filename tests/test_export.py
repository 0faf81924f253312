"""`rlhf export`: adapter folders, merged models that plain transformers loads with equal outputs, the
reward model as sequence classification, QLoRA merged into its dequantised base, P-tuning refusing."""

import json
from pathlib import Path

import pytest
import torch

from stages.dpo.recipe import train_dpo
from stages.io.config import ConfigError, load_config
from stages.io.sections import needs_4bit
from stages.model.backbone import load_backbone
from stages.model.reward_model import PROBES
from stages.reward.recipe import train_reward
from stages.sft.recipe import train_sft
from stages.tools.export import EXPORT_FILE, ExportError, export_run
from stages.tools.export import plan_export as _plan_export
from stages.training.runner import execute
from tests.conftest import TINY, run_cli

TEXTS = ["3+4=", "12+19=31", "Hello, world"]


def plan_export(run_dir: Path, stage: str | None, merge: bool):
    return _plan_export(run_dir, load_config(run_dir / "config.yaml"), stage, merge)


def _run(root: Path, sets: list[str], stages: tuple[str, ...] = ("sft",)) -> Path:
    """A run folder as the flow leaves it: its config.yaml and one finished artifact per stage."""
    cfg = load_config(None, [*TINY, "tracking.backend=none", f"run.stages=[{','.join(stages)}]", *sets])
    run_dir = root / "runs" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    for stage in stages:
        inputs = {"sft": run_dir / "sft"} if stage == "dpo" else {}
        execute(
            stage, {"sft": train_sft, "reward": train_reward, "dpo": train_dpo}[stage], cfg, run_dir / stage, inputs
        )
    return run_dir


def _unmerged_logits(run_dir: Path, stage: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """What the stage computes: its adapter with plain PEFT on the backbone as the stage loads it."""
    from peft import PeftModel

    cfg = load_config(run_dir / "config.yaml")
    backbone = load_backbone(cfg.backbone, quantize_4bit=needs_4bit(cfg.adapter.kind))
    model = PeftModel.from_pretrained(backbone.model, str(run_dir / stage / "adapter"))
    with torch.no_grad():
        return model(**batch).logits.float()


@pytest.mark.parametrize(
    ("sets", "atol"),
    [
        ([], 1e-4),
        (["adapter.kind=dora"], 1e-4),
        (["adapter.kind=adalora", "ppo.value_model=shared"], 1e-4),  # 1.1e-5 seen
        (["adapter.kind=qlora"], 1e-3),  # merged into the dequantised nf4 weights, in float32
        (["adapter.kind=qlora", "backbone.dtype=bfloat16"], 0.25),  # the merged weights round to bf16
        (["backbone.name=builtin:tiny-chat"], 1e-4),  # BOS, no pad token, a chat template's end of turn
    ],
    ids=["lora", "dora", "adalora", "qlora", "qlora-bf16", "chat-tokenizer"],
)
def test_merged_policy_loads_with_plain_transformers_and_equals_base_plus_adapter(
    sets: list[str], atol: float, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = _run(tmp_path, sets)
    record = export_run(plan_export(run_dir, "sft", merge=True), tmp_path / "out")
    assert (record["format"], record["merged"]) == ("causal-lm", True)

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # no PEFT, no bitsandbytes
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert not any("lora" in name or "Linear4bit" in type(m).__name__ for name, m in merged.named_modules())
    assert getattr(merged.config, "quantization_config", None) is None
    assert merged.dtype == getattr(torch, load_config(run_dir / "config.yaml").backbone.dtype)
    from stages.model.tokenization import Tokenization

    tokenization = Tokenization.of(tokenizer, "auto")  # generate() stops where the stages' generation stopped
    stops = merged.generation_config.eos_token_id
    assert set(stops if isinstance(stops, list) else [stops]) == set(tokenization.stop_ids)
    assert merged.generation_config.pad_token_id == tokenization.pad_id
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        found = merged(**batch).logits.float()
    expected = _unmerged_logits(run_dir, "sft", batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(found[real], expected[real], rtol=0, atol=atol)


def test_a_qlora_sft_dpo_chain_of_the_shipped_length_exports_its_fp32_adapters(tmp_path: Path) -> None:
    """Issue 29, fault 1: TRL's SFTTrainer and DPOTrainer cast a 4-bit model's trainable parameters to bf16,
    so after 20 SFT or 10 DPO steps the saved adapters were bf16 and their logits 7e-3 to 1e-2 away from
    the stage's probes: both exports were refused. At the shipped step counts (SFT 150, DPO 60) the
    adapters are fp32 files and every export, merged or not, passes its check against the probes."""
    from safetensors import safe_open

    shipped = load_config(None)
    run_dir = _run(
        tmp_path,
        [
            "adapter.kind=qlora",
            f"sft.max_steps={shipped.sft.max_steps}",
            f"dpo.max_steps={shipped.dpo.max_steps}",
            "task.num_sft=512",
            "task.num_pairs=512",
        ],
        stages=("sft", "dpo"),
    )
    for stage in ("sft", "dpo"):
        with safe_open(str(run_dir / stage / "adapter" / "adapter_model.safetensors"), "pt") as weights:
            assert {weights.get_slice(k).get_dtype() for k in weights.keys()} == {"F32"}, stage
        for merge in (False, True):
            record = export_run(plan_export(run_dir, stage, merge=merge), tmp_path / f"{stage}-{merge}")
            assert record["merged"] is merge


def test_reward_model_exports_as_sequence_classification_with_its_stage_scores(tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    run_dir = _run(tmp_path, [], stages=("reward",))
    record = export_run(plan_export(run_dir, "reward", merge=True), tmp_path / "rm")
    assert record["format"] == "sequence-classification" and not record["notes"]

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    probes = json.loads((run_dir / "reward" / PROBES).read_text())
    # Right-padded together, as a serving stack batches them: transformers pools the last non-pad token.
    width = max(len(p["ids"]) for p in probes)
    pad = model.config.pad_token_id
    ids = torch.tensor([p["ids"] + [pad] * (width - len(p["ids"])) for p in probes])
    with torch.no_grad():
        scores = model(input_ids=ids, attention_mask=(ids != pad).long()).logits[:, 0]
    torch.testing.assert_close(scores, torch.tensor([p["score"] for p in probes]), rtol=0, atol=1e-4)

    adapter = export_run(plan_export(run_dir, "reward", merge=False), tmp_path / "rm-adapter")
    assert adapter["format"] == "peft-adapter"
    assert {p.name for p in (tmp_path / "rm-adapter").iterdir()} == {
        "adapter",
        "score_head.safetensors",
        "tokenizer",
        EXPORT_FILE,
        "README.md",
    }


def test_adapter_export_names_the_exact_base_and_ptuning_refuses_to_merge(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = _run(tmp_path, ["adapter.kind=ptuning_v2"])
    record = export_run(plan_export(run_dir, None, merge=True), tmp_path / "out")
    assert (record["format"], record["merged"]) == ("peft-adapter", False)
    assert "ptuning_v2 cannot be merged" in record["notes"][0]
    saved = json.loads((tmp_path / "out" / EXPORT_FILE).read_text())
    manifest = json.loads((run_dir / "sft" / "manifest.json").read_text())
    assert saved["base_model"]["fingerprint"] == manifest["backbone_fingerprint"]
    assert saved["base_model"]["name"] == "builtin:tiny" and saved["base_model"]["revision"] is None
    assert "cannot be merged" in (tmp_path / "out" / "README.md").read_text()
    # The folder loads as the README says: plain PEFT on the named base.
    base = AutoModelForCausalLM.from_pretrained(saved["base_model"]["location"])
    PeftModel.from_pretrained(base, str(tmp_path / "out" / "adapter"))


def test_export_refuses_what_it_cannot_do_and_publishes_nothing_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stages.tools.export

    run_dir = _run(tmp_path, [])
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConfigError, match="already exists"):
        export_run(plan_export(run_dir, "sft", merge=True), tmp_path / "taken")
    with pytest.raises(ConfigError, match=r"--stage ppo: not among run r's stages \['sft'\]"):
        plan_export(run_dir, "ppo", merge=True)
    monkeypatch.setitem(stages.tools.export.TOLERANCE, "float32", -1.0)  # any drift at all now fails the check
    with pytest.raises(ExportError, match="differ from its stage's"):
        export_run(plan_export(run_dir, "sft", merge=True), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs", "taken"]  # no out, no .out.partial


def test_rlhf_export_command(tmp_path: Path) -> None:
    run_dir = _run(tmp_path, [])
    done = run_cli(
        "export", "r", "--out", str(tmp_path / "m"), "--merge", "--runs-dir", str(run_dir.parent), cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "exported r/sft as causal-lm" in done.stdout
    again = run_cli("export", "r", "--out", str(tmp_path / "m"), "--runs-dir", str(run_dir.parent), cwd=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_merging_a_reward_model_whose_tokenizer_pads_with_its_end_token_is_refused(tmp_path: Path) -> None:
    # builtin:tiny-chat has no pad token: it pads with its end token, as many chat models do.
    run_dir = _run(tmp_path, ["backbone.name=builtin:tiny-chat"], stages=("reward",))
    with pytest.raises(ExportError, match="the tokenizer pads with its end token .* export without --merge"):
        export_run(plan_export(run_dir, "reward", merge=True), tmp_path / "rm")
    assert not (tmp_path / "rm").exists()
    assert export_run(plan_export(run_dir, "reward", merge=False), tmp_path / "rm")["format"] == "peft-adapter"


def test_a_hub_backbone_is_pinned_to_its_snapshot_commit(tmp_path: Path) -> None:
    """A hub id at ``main`` (or no revision) is recorded with the commit of the snapshot it loads from, read
    from the local HF cache's own layout (``models--ORG--NAME/refs/main``, ``snapshots/<commit>``)."""
    import os
    import subprocess
    import sys

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-chat"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    code = (
        "from stages.io.config import BackboneSection\nfrom stages.io.backbone_files import hub_commit\n"
        "print(hub_commit(BackboneSection(name='acme/tiny-chat')), hub_commit(BackboneSection(name='builtin:tiny')))"
    )
    found = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub")},
    ).stdout.split()
    assert found == [commit, "None"]
