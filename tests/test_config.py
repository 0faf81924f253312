from pathlib import Path

import pytest

from stages.io.config import ConfigError, PipelineConfig, load_config


def test_embedded_default_matches_the_typed_defaults() -> None:
    # configs/default.yaml documents the defaults; it must not drift from the models.
    assert load_config() == PipelineConfig()


def test_file_and_overrides_apply_in_order(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("sft:\n  max_steps: 7\nadapter:\n  kind: qlora\n")
    cfg = load_config(path, ["sft.max_steps=9", "run.stages=[sft]", "eval.temperature=0.5"])
    assert (cfg.sft.max_steps, cfg.adapter.kind, cfg.eval.temperature) == (9, "qlora", 0.5)
    assert cfg.sft.batch_size == PipelineConfig().sft.batch_size  # untouched keys keep defaults


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("sft:\n  max_stepz: 3\n", "sft.max_stepz: unknown key"),
        ("sft:\n  max_steps: many\n", "sft.max_steps: Input should be a valid integer"),
        ("adapter:\n  kind: ia3\n", "adapter.kind: Input should be 'lora', 'qlora', 'dora', 'adalora' or 'ptuning_v2'"),
        (
            "adapter:\n  kind: adalora\n",
            "PPO with ppo.value_model: separate trains two adapters (policy and value) and "
            "PEFT's AdaLoRA trains one per model; set ppo.value_model: shared",
        ),
        (
            "adapter:\n  kind: adalora\n  target_r: 9\nppo:\n  value_model: shared\n",
            "adapter: Value error, target_r=9 is above r=8",
        ),
        (
            "adapter:\n  kind: adalora\nppo:\n  value_model: shared\nsft:\n  launcher: accelerate\n",
            "adapter.kind=adalora: sft launch on DeepSpeed, whose ZeRO partitions the gradients",
        ),
        ("sft:\n  learning_rate: -1\n", "sft.learning_rate: Input should be greater than or equal to 0 (got -1)"),
        ("sft:\n  batch_size: 0\n", "sft.batch_size: Input should be greater than or equal to 1 (got 0)"),
        ("reward:\n  batch_size: -4\n", "reward.batch_size: Input should be greater than or equal to 1 (got -4)"),
        ("ppo:\n  learning_rate: -0.1\n", "ppo.learning_rate: Input should be greater than or equal to 0 (got -0.1)"),
        (
            "run:\n  stages: [sft, kto]\n",
            "run.stages.1: Input should be 'sft', 'reward', 'rrhf', 'ppo', 'dpo' or 'grpo' (got 'kto')",
        ),
        ("run:\n  stages: [ppo, sft]\n", "run: Value error, stages must be unique and in pipeline order"),
        ("- just\n- a list\n", "the top level must be a mapping"),
        ("sft: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path: Path, yaml_text: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value)
    assert expected in str(err.value)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("sft.nope=1", "sft.nope: unknown key"),
        ("sft.max_steps.deeper=1", "sft.max_steps is a value, not a section"),
        ("no_equals_sign", "expected KEY.PATH=VALUE"),
        ("eval.num_prompts=0", "eval.num_prompts: Input should be greater than or equal to 1"),
    ],
)
def test_bad_override_is_named(override: str, expected: str) -> None:
    with pytest.raises(ConfigError, match="--set") as err:
        load_config(None, [override])
    assert expected in str(err.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "absent.yaml")


def test_config_digest_depends_only_on_named_sections() -> None:
    base = load_config()
    other_eval = load_config(None, ["eval.temperature=0.7"])
    assert base.digest("sft") == other_eval.digest("sft")
    assert base.digest("sft", "eval") != other_eval.digest("sft", "eval")


def test_every_shipped_config_is_valid() -> None:
    shipped = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert len(shipped) >= 3
    for path in shipped:
        load_config(path)
