"""The chain on a real CUDA device (issue 14, item 1), marked ``gpu``: skipped where no GPU is visible,
so CPU CI collects and skips them. ``bench/gpu_check.sh`` runs them with the default chain and the PPO
benchmark. The CPU stand-in for these checks is ``tests/test_devices.py``.
"""

import math
from pathlib import Path

import pytest

from stages.io.config import load_config
from stages.model.backbone import load_backbone
from stages.model.reward_model import attach_reward
from stages.model.tokenization import Tokenization
from stages.reward.recipe import train_reward
from stages.training.runner import execute
from tests.conftest import TINY, chain_stages

pytestmark = pytest.mark.gpu
CUDA = [*TINY, "backbone.device=cuda", "tracking.backend=none"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["lora", "qlora", "ptuning_v2"])
def test_every_stage_runs_on_cuda(kind: str, dtype: str, tmp_path: Path) -> None:
    """SFT -> reward -> PPO and RRHF on the GPU, per adapter kind and dtype: each stage publishes finite
    metrics and says it ran on CUDA; PPO and RRHF reload the reward model (its probe check passes)."""
    cfg = load_config(None, [*CUDA, f"adapter.kind={kind}", f"backbone.dtype={dtype}"])
    for stage, (train, inputs) in chain_stages().items():
        manifest = execute(stage, train, cfg, tmp_path / stage, {name: tmp_path / name for name in inputs})
        assert manifest is not None and manifest["launch"]["device"] == "cuda"
        numbers = [v for v in manifest["metrics"].values() if isinstance(v, float)]
        assert numbers and all(math.isfinite(v) for v in numbers), (stage, manifest["metrics"])


def test_the_backbone_loads_onto_the_gpu() -> None:
    for kind in ("lora", "qlora"):
        backbone = load_backbone(load_config(None, CUDA).backbone, quantize_4bit=kind == "qlora")
        assert {p.device.type for p in backbone.model.parameters()} == {"cuda"}, kind


def test_a_reward_model_trained_on_the_gpu_scores_the_same_on_the_cpu(tmp_path: Path) -> None:
    """An artifact does not depend on where it was made: the CPU reload passes the probe check (1e-4)."""
    execute("reward", train_reward, load_config(None, CUDA), tmp_path / "reward", {})
    backbone = load_backbone(load_config(None, [*TINY, "backbone.device=cpu"]).backbone)
    model, head = attach_reward(
        backbone.model, tmp_path / "reward", Tokenization.of(backbone.tokenizer), backbone.fingerprint
    )  # raises when a probe score moved by more than 1e-4
    assert head.weight.device.type == "cpu" and next(model.parameters()).device.type == "cpu"
