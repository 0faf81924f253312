"""The memory plan: hand-checkable terms, monotonicity, ZeRO, and the CLI's plan and refusal."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from stages.io.config import AdapterSection, load_config
from stages.memory.plan import (
    DTYPE_BYTES,
    NF4_BYTES_PER_PARAM,
    DataShape,
    Device,
    Estimate,
    ModelShape,
    Parallel,
    adapter_parameters,
    estimate,
    stage_workload,
    weights_bytes,
)
from tests.conftest import run_cli

BUILTIN = ModelShape(
    vocab_size=261,
    hidden_size=128,
    intermediate_size=384,
    num_layers=4,
    num_heads=4,
    num_kv_heads=4,
    head_dim=32,
    tie_word_embeddings=True,
)
# A Llama-2-7B-like shape: big enough that ZeRO's per-rank shares dominate its fixed terms.
LARGE = ModelShape(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_layers=32,
    num_heads=32,
    num_kv_heads=32,
    head_dim=128,
    tie_word_embeddings=False,
)
DATA = DataShape(
    demos=512,
    demo_tokens=16,
    prompts=336,
    prompt_tokens=8,
    prompt_tokens_min=6,
    pairs=512,
    pair_tokens=16,
    eval_prompts=64,
    eval_prompt_tokens=8,
)
LORA = AdapterSection()
ZERO2 = Parallel(launched=True, zero_stage=2, world_size=4, local_ranks=4)
ZERO3 = dataclasses.replace(ZERO2, zero_stage=3)
ZERO3_OFFLOAD = dataclasses.replace(ZERO3, offload_optimizer=True, offload_params=True)


def plan(
    stage: str,
    overrides: list[str] | tuple[str, ...] = (),
    shape: ModelShape = BUILTIN,
    parallel: Parallel = Parallel(),
    device: Device = "cpu",
    data: DataShape = DATA,
) -> Estimate:
    """The estimate of one stage on the built-in task's data shape, with config overrides."""
    cfg = load_config(None, ["run.stages=[sft,reward,rrhf,ppo]", *overrides])
    return estimate(
        stage_workload(stage, cfg, data, parallel), shape, cfg.backbone.dtype, cfg.adapter, parallel, device
    )


def test_parameter_and_adapter_counts_match_the_real_models() -> None:
    """The counts read off config.json equal what torch and PEFT build from it."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from stages.memory.inputs import read_model_shape
    from stages.model.adapters import ADAPTER_KINDS
    from stages.model.backbone import resolve_backbone

    cfg = load_config()
    folder = resolve_backbone(cfg.backbone)  # built first: reading its shape never builds it
    shape = read_model_shape(cfg)
    assert shape == dataclasses.replace(BUILTIN, vocab_size=shape.vocab_size)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert shape.parameters == sum(p.numel() for p in model.parameters())  # tied embeddings count once
    for kind in ("lora", "dora", "adalora", "ptuning_v2"):
        adapter = AdapterSection(kind=kind)
        peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(folder), ADAPTER_KINDS[kind](adapter, 10))
        assert adapter_parameters(shape, adapter) == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def test_weights_term_is_params_times_bytes_and_nf4_is_smaller() -> None:
    assert LARGE.parameters == 6_738_415_616  # Llama-2-7B's published count
    assert weights_bytes(LARGE, "float32", nf4=False) == LARGE.parameters * 4
    assert weights_bytes(LARGE, "bfloat16", nf4=False) == LARGE.parameters * 2
    nf4 = weights_bytes(LARGE, "bfloat16", nf4=True)
    assert nf4 == pytest.approx(LARGE.linear_parameters * NF4_BYTES_PER_PARAM + LARGE.other_parameters * 4, abs=1)
    assert nf4 < weights_bytes(LARGE, "bfloat16", nf4=False) / 2
    assert plan("sft", shape=LARGE).weights == LARGE.parameters * DTYPE_BYTES["float32"]
    # On a GPU the 4-bit backbone is what it holds; on the CPU the checkpoint it was read from stays in RSS.
    gpu, cpu = (plan("sft", ["adapter.kind=qlora"], shape=LARGE, device=d).weights for d in ("cuda", "cpu"))
    assert gpu == weights_bytes(LARGE, "float32", nf4=True) and cpu > LARGE.parameters * 4


def test_trainable_state_is_sixteen_bytes_per_parameter() -> None:
    """fp32 adapter + gradient + two AdamW moments; frozen adapters (PPO's reference and reward) just 4."""
    per_adapter = adapter_parameters(BUILTIN, LORA)
    assert plan("sft").adapters_optimizer == 16 * per_adapter
    head = BUILTIN.hidden_size + 1
    assert plan("ppo").adapters_optimizer == 16 * (2 * per_adapter + head) + 4 * (2 * per_adapter + head)


@pytest.mark.parametrize(
    "stage,key,low,high",
    [
        ("sft", "sft.batch_size", 4, 64),
        ("sft", "sft.max_length", 8, 16),  # the data's longest demo is 16 tokens: max_length caps it
        ("reward", "reward.batch_size", 16, 256),
        ("ppo", "ppo.minibatch_size", 16, 256),
        ("ppo", "ppo.max_new_tokens", 16, 512),
        ("rrhf", "rrhf.num_candidates", 4, 64),
        ("rrhf", "rrhf.batch_size", 4, 64),
    ],
)
def test_estimate_grows_with_batch_and_length(stage: str, key: str, low: int, high: int) -> None:
    small, big = plan(stage, [f"{key}={low}"], shape=LARGE), plan(stage, [f"{key}={high}"], shape=LARGE)
    assert big.total > small.total
    assert big.weights == small.weights and big.adapters_optimizer == small.adapters_optimizer


def test_batches_never_exceed_the_data() -> None:
    """A batch larger than the dataset is the dataset: the estimate does not grow past it."""
    assert plan("sft", ["sft.batch_size=512"]).total == plan("sft", ["sft.batch_size=100000"]).total


def test_bf16_costs_less_and_a_larger_model_more() -> None:
    assert plan("reward", ["backbone.dtype=bfloat16"], shape=LARGE).total < plan("reward", shape=LARGE).total
    assert plan("reward", shape=LARGE).total > plan("reward").total


def test_zero3_divides_the_weights_by_the_ranks() -> None:
    zero2, zero3 = (plan("sft", ["sft.launcher=accelerate"], LARGE, p) for p in (ZERO2, ZERO3))
    assert zero2.weights == LARGE.parameters * 4
    assert 3.0 < zero2.weights / zero3.weights <= 4.0  # 4 ranks, plus the gathered layers
    assert zero3.adapters_optimizer < zero2.adapters_optimizer  # the adapters are partitioned too
    assert zero3.ranks == 4 and zero3.host_total == 4 * zero3.total + zero3.launcher


def test_offload_moves_optimizer_state_and_params_off_the_gpu() -> None:
    on, off = (plan("sft", ["sft.launcher=accelerate"], LARGE, p, device="cuda") for p in (ZERO3, ZERO3_OFFLOAD))
    assert off.adapters_optimizer < on.adapters_optimizer and off.weights < on.weights
    assert off.total < on.total and off.host > on.host
    moved = (on.adapters_optimizer - off.adapters_optimizer) + (on.weights - off.weights)
    assert off.host - on.host == moved
    # On the CPU the device is the host: offloading moves nothing.
    on_cpu, off_cpu = (plan("sft", ["sft.launcher=accelerate"], LARGE, p) for p in (ZERO3, ZERO3_OFFLOAD))
    assert on_cpu.total == off_cpu.total and off_cpu.host == 0


def test_zero_config_is_read_from_the_presets_and_a_json_path(tmp_path: Path) -> None:
    from stages.memory import inputs as memory_inputs

    assert memory_inputs.read_zero_config("zero2") == (2, False, False)
    assert memory_inputs.read_zero_config("zero3_offload") == (3, True, True)
    custom = tmp_path / "ds.json"
    custom.write_text(json.dumps({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}))
    assert memory_inputs.read_zero_config(str(custom)) == (2, True, False)
    assert memory_inputs.read_zero_config("zero3") == (3, False, False)


def test_shape_errors_name_the_backbone() -> None:
    from stages.io.config import ConfigError
    from stages.memory.inputs import shape_from_config

    gqa = shape_from_config(
        {
            "vocab_size": 10,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "dtype": "bfloat16",
        },
        "x",
    )
    assert gqa.kv_dim == 32 and gqa.head_dim == 16 and gqa.checkpoint_dtype == "bfloat16"
    with pytest.raises(ConfigError, match=r"backbone.name='odd'.*hidden_size"):
        shape_from_config({"vocab_size": 10}, "odd")


def test_plan_json_on_the_default_config_imports_no_torch(tmp_path: Path) -> None:
    result = run_cli("plan", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    plan_json = json.loads(result.stdout)
    assert list(plan_json["stages"]) == ["sft", "reward", "ppo"]
    for entry in plan_json["stages"].values():
        assert entry["device"] in ("cpu", "cuda") and entry["available"] > 0
        parts = sum(
            entry[k] for k in ("weights", "adapters_optimizer", "activations", "logits", "kv_cache", "overhead")
        )
        assert entry["total"] == parts and entry["fits"] is True
    if not Path("/proc/driver/nvidia/version").exists():  # without a GPU the plan never starts torch
        code = (
            "import sys\nfrom flows import cli\ncli.main(['plan'])\n"
            "assert not [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        )
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, cwd=tmp_path)


OVERSIZED = ["--set", "run.stages=[sft,reward,rrhf]", "--set", "rrhf.num_candidates=1000000"]


def test_run_refuses_an_oversized_stage_before_anything_starts(tmp_path: Path) -> None:
    result = run_cli("run", *OVERSIZED, "--run-id", "big", cwd=tmp_path)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and line.startswith("error: stage rrhf needs about ")
    assert "rrhf.num_candidates (now 1000000)" in line and "--skip-memory-check" in line
    assert not (tmp_path / "runs" / "big" / "sft").exists() and not (tmp_path / "runs").exists()


def test_skip_memory_check_gets_past_the_preflight(tmp_path: Path) -> None:
    """With the flag, run and stage reach the run lock (held here), which stops them before any training."""
    from filelock import FileLock

    run_dir = tmp_path / "runs" / "big"
    run_dir.mkdir(parents=True)
    with FileLock(str(run_dir / ".running.lock")):
        skipped = run_cli("run", *OVERSIZED, "--run-id", "big", "--skip-memory-check", cwd=tmp_path)
        assert skipped.returncode == 2 and "is already running" in skipped.stderr, skipped.stderr[-2000:]

        refused = run_cli("stage", "rrhf", "--run", "big", "--set", "rrhf.num_candidates=2000000", cwd=tmp_path)
        assert refused.returncode == 2 and "error: stage rrhf needs about" in refused.stderr, refused.stderr[-2000:]
        assert "num_candidates: 1000000" in (run_dir / "config.yaml").read_text()  # unchanged when refused
        skipped = run_cli(
            "stage", "rrhf", "--run", "big", "--set", "rrhf.num_candidates=2000000", "--skip-memory-check", cwd=tmp_path
        )
        assert skipped.returncode == 2 and "is already running" in skipped.stderr, skipped.stderr[-2000:]
    assert not (run_dir / "sft").exists() and not (run_dir / "rrhf").exists()


def test_a_shared_value_model_plans_one_trainable_adapter_fewer() -> None:
    separate, shared = plan("ppo", shape=LARGE), plan("ppo", ["ppo.value_model=shared"], shape=LARGE)
    assert shared.adapters_optimizer < separate.adapters_optimizer and shared.total < separate.total
