"""Test session setup: an isolated RLHF_HOME per session that shares only the built-in backbone build.

The backbone build (about two minutes on 2 cores) is cached in the repository's ``.rlhf/backbones`` so
``make test`` and ``make run`` build it once between them; everything else (cache, Prefect state, runs)
lives in a fresh temporary folder, so tests never see each other's or a user's state.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
# A few steps and prompts: enough to prove behaviour, small enough for a 2-core CI machine. On the CPU
# also on a GPU machine (the gpu tier sets backbone.device=cuda after it).
TINY = [
    "backbone.device=cpu",
    "run.threads=2",
    "sft.max_steps=3",
    "sft.logging_steps=1",
    "eval.num_prompts=8",
    "task.num_sft=32",
    "task.num_pairs=32",
    "reward.max_steps=4",
    "reward.batch_size=4",
    "reward.logging_steps=1",
    "ppo.updates=2",
    "ppo.rollout_prompts=4",
    "ppo.minibatch_size=2",
    "ppo.ppo_epochs=1",
    "ppo.max_new_tokens=8",
    "rrhf.max_steps=3",
    "rrhf.num_prompts=6",
    "rrhf.batch_size=3",
    "rrhf.num_candidates=3",
    "rrhf.logging_steps=1",
    "dpo.max_steps=3",
    "dpo.batch_size=4",
    "dpo.logging_steps=1",
    "dpo.checkpoint_every=3",
    "grpo.max_steps=2",
    "grpo.prompts_per_step=3",
    "grpo.num_generations=3",
    "grpo.minibatch_size=4",
    "grpo.max_new_tokens=8",
]


# Tests by speed (pyproject's markers). ``make test-fast`` runs the unit tier, ``make test`` (CI) all.
TIERS = {
    "unit": (
        "test_losses",
        "test_kl_control",
        "test_config",
        "test_registry",
        "test_task_and_data",
        "test_rewards",
        "test_distributed_math",
        "test_sequences",
        "test_artifacts_and_cache",
        "test_memory_plan",
        "test_progress",
        "test_layout",
        "test_updater",
        "test_formats",
        "test_early_stopping",
        "test_shape_chain",
    ),
    "stage": (
        "test_adapters",
        "test_learning_check",
        "test_learning_per_kind",
        "test_ppo",
        "test_reward_rrhf",
        "test_dpo",
        "test_grpo",
        "test_deepspeed",
        "test_tokenization",
        "test_packing",
        "test_samples",
        "test_family_contract",
        "test_logprob_gap",
        "test_devices",
        "test_export",
        "test_early_stops",
        "test_families",
    ),
    "e2e": (
        "test_cli_pipeline",
        "test_bad_inputs",
        "test_concurrency_and_secrets",
        "test_prefect_server",
        "test_resume",
        "test_family_runs",
        "test_plugin_stage",
        "test_promotion",
        "test_dashboard",
        "test_sweep",
    ),
    "quality": ("test_quality",),
    "gpu": ("test_gpu",),  # skipped where no CUDA device is visible (bench/gpu_check.sh runs them on a GPU)
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test with its file's tier; a test file in no tier is an error, not a silent omission.
    The ``gpu`` tier is skipped where no CUDA device is visible."""
    from stages.io.devices import cuda_available

    tier_of = {module: tier for tier, modules in TIERS.items() for module in modules}
    for item in items:
        module = item.path.stem
        if module not in tier_of:
            raise pytest.UsageError(f"tests/{module}.py is in no tier: add it to TIERS in tests/conftest.py")
        item.add_marker(tier_of[module])
        if tier_of[module] == "gpu" and not cuda_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device (bench/gpu_check.sh)"))


@pytest.fixture(autouse=True)
def cpu_unless_gpu_tier(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every tier but ``gpu`` computes on the CPU, also on a GPU machine: its expectations (figures,
    ``device == "cpu"``) are the CPU's. Hiding the GPUs also hides them from the stages it launches;
    module-scoped fixtures, set up before this, use ``TINY``, which says ``backbone.device=cpu``."""
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(scope="session", autouse=True)
def rlhf_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("rlhf_home")
    shared = REPO / ".rlhf" / "backbones"
    shared.mkdir(parents=True, exist_ok=True)
    (home / "backbones").symlink_to(shared, target_is_directory=True)
    os.environ["RLHF_HOME"] = str(home)
    os.environ["PREFECT_HOME"] = str(home / "prefect")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ["WANDB_MODE"] = "offline"
    os.environ["HF_HUB_OFFLINE"] = "1"  # no hub here: fail at once instead of retrying for 25 s
    # Built once, explicitly, as the CLI's pre-flight does: a cache key or a memory plan never builds it.
    subprocess.run(
        [sys.executable, "-m", "stages.model.builtin_backbone", "--chat"],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return home


def base_elements(model: Any) -> int:
    """Elements of the base weights a model holds in memory: each storage counted once (a tied embedding
    is one tensor), so one backbone under four adapters counts as one backbone."""
    from stages.model.backbone import base_parameters

    return sum({t.untyped_storage().data_ptr(): t.numel() for t in base_parameters(model).values()}.values())


def run_cli(
    *args: str, cwd: Path, timeout: int = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real ``rlhf`` console script in a child process, as a user would."""
    rlhf = Path(sys.executable).parent / "rlhf"
    return subprocess.run(
        [str(rlhf), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def train_upstream(root: Path, overrides: list[str]) -> dict[str, Path]:
    """Local SFT and reward artifacts, for tests of the stages that consume them (PPO, RRHF)."""
    from stages.io.config import load_config
    from stages.reward.recipe import train_reward
    from stages.sft.recipe import train_sft
    from stages.training.runner import execute

    cfg = load_config(None, overrides)
    execute("sft", train_sft, cfg, root / "sft", {})
    execute("reward", train_reward, cfg, root / "reward", {})
    return {"sft": root / "sft", "reward": root / "reward"}


def chain_stages() -> dict[str, tuple[Callable[..., Any], list[str]]]:
    """Each built-in stage's train function and the upstream artifacts it reads, in chain order."""
    from stages.dpo.recipe import train_dpo
    from stages.grpo.recipe import train_grpo
    from stages.ppo.recipe import train_ppo
    from stages.reward.recipe import train_reward
    from stages.rrhf.recipe import train_rrhf
    from stages.sft.recipe import train_sft

    return {
        "sft": (train_sft, []),
        "reward": (train_reward, []),
        "ppo": (train_ppo, ["sft", "reward"]),
        "rrhf": (train_rrhf, ["sft", "reward"]),
        "dpo": (train_dpo, ["sft"]),
        "grpo": (train_grpo, ["sft", "reward"]),
    }


def stage_command(stage: str, out: Path, overrides: list[str], inputs: dict[str, Path] | None = None) -> list[str]:
    """``python -m stages.<stage>`` (or its ``accelerate launch``, per the config) as the flow would run it."""
    from flows.launch import accelerate_command
    from stages.io.config import load_config

    args = [
        "--out",
        str(out),
        *(f"--input={k}={v}" for k, v in (inputs or {}).items()),
        *(a for item in overrides for a in ("--set", item)),
    ]
    cfg = load_config(None, overrides)
    if cfg.launcher(stage) == "accelerate":
        return accelerate_command(stage, cfg, args)
    return [sys.executable, "-m", "stages.training.entry", stage, *args]
