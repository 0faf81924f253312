"""Device placement, checked on a CPU-only machine (issue 14, fault 10).

Every tensor a stage makes for its model must be made on the model's device. ``ForeignDefaultDevice``
(``tests/device_double.py``) moves the default device of project code away from the model's, as a GPU
run does; a stage that forgets a ``device=`` then fails here exactly where it would fail on CUDA. The
real CUDA run is ``tests/test_gpu.py`` (``bench/gpu_check.sh``), skipped where no GPU is.
"""

from pathlib import Path

import pytest
import torch

import tests.device_double as double
from stages.io.config import load_config
from stages.model.placement import device_type
from stages.ppo import train_ppo
from stages.reward import train_reward
from stages.rrhf import train_rrhf
from stages.sft import train_sft
from stages.training.runner import execute
from tests.conftest import TINY

STAGES = {"sft": (train_sft, []), "reward": (train_reward, []), "ppo": (train_ppo, ["sft", "reward"]),
          "rrhf": (train_rrhf, ["sft", "reward"])}


def test_the_double_moves_project_code_tensors_off_the_model_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: a device-less tensor made by project code (here, this file) lands on another device
    than a CPU model, and mixing the two fails as on a GPU; a tensor that names its device does not."""
    monkeypatch.setattr(double, "PROJECT_CODE", str(Path(__file__).parent))
    model = torch.nn.Linear(3, 1)
    with double.ForeignDefaultDevice() as mode:
        forgotten, placed = torch.zeros(1, 3), torch.zeros(1, 3, device="cpu")
        assert model(placed).shape == (1, 1)
        with pytest.raises((RuntimeError, NotImplementedError), match="meta|device"):
            model(forgotten).sum().item()
    assert forgotten.device.type == "meta" and mode.created == 1


@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_every_stage_creates_its_tensors_on_the_model_device(kind: str, tmp_path: Path) -> None:
    """SFT, reward, PPO and RRHF, each with the default device moved off the model's: every batch, head,
    mask and loss tensor is made where the model is (QLoRA: the 4-bit loader places its own weights)."""
    cfg = load_config(None, [*TINY, f"adapter.kind={kind}", "tracking.backend=none"])
    with double.ForeignDefaultDevice() as mode:
        for stage, (train, inputs) in STAGES.items():
            manifest = execute(stage, train, cfg, tmp_path / stage, {name: tmp_path / name for name in inputs})
            assert manifest is not None and manifest["launch"]["device"] == "cpu", manifest
    assert mode.created == 0


def test_the_cache_key_holds_the_resolved_device_not_the_setting() -> None:
    """``auto`` and ``cpu`` compute on the same device here, so they share a cache; a stage's manifest
    says where it ran."""
    from stages.io.provenance import stage_provenance

    keys = {setting: stage_provenance("sft", load_config(None, [f"backbone.device={setting}"]), {})["cache_key"]
            for setting in ("auto", "cpu")}
    assert keys["auto"] == keys["cpu"]
    assert device_type(load_config(None, []).backbone) == ("cuda" if torch.cuda.is_available() else "cpu")
