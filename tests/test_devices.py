"""Device placement, checked on a CPU-only machine (issue 14, fault 10).

Every tensor a stage makes for its model must be made on the model's device. ``ForeignDefaultDevice``
(``tests/device_double.py``) moves the default device of project code away from the model's, as a GPU
run does; a stage that forgets a ``device=`` then fails here exactly where it would fail on CUDA. The
real CUDA run is ``tests/test_gpu.py`` (``bench/gpu_check.sh``), skipped where no GPU is.
"""

from pathlib import Path

import pytest
import torch

import stages.model.placement as placement
import tests.device_double as double
from stages.io.config import load_config
from stages.training.runner import execute
from tests.conftest import TINY, chain_stages


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
        for stage, (train, inputs) in chain_stages().items():
            manifest = execute(stage, train, cfg, tmp_path / stage, {name: tmp_path / name for name in inputs})
            assert manifest is not None and manifest["launch"]["device"] == "cpu", manifest
    assert mode.created == 0


def test_the_cache_key_holds_the_resolved_device_not_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stage's cache key says where it computed: ``auto`` shares the cache of the device it resolves to
    (``cuda`` with a GPU, ``cpu`` without), and a CPU result is never served to a GPU run."""
    from stages.io.provenance import stage_provenance

    def key(setting: str) -> str:
        return stage_provenance("sft", load_config(None, [f"backbone.device={setting}"]), {})["cache_key"]

    assert key("auto") == key("cpu")  # no GPU here
    monkeypatch.setattr(placement, "cuda_available", lambda: True)  # as on a GPU machine
    assert key("auto") == key("cuda") != key("cpu")


def test_what_each_stage_process_sees_of_the_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU machine (its probe faked): ``cpu`` hides every GPU from accelerate and DeepSpeed, a local
    stage sees one (the first visible), and accelerate ranks see them all (one each, by LOCAL_RANK)."""
    monkeypatch.setattr(placement, "cuda_available", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    cpu, auto = (load_config(None, [f"backbone.device={d}"]).backbone for d in ("cpu", "auto"))
    assert placement.visible_gpus_env(cpu, launched=False) == {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}
    assert placement.visible_gpus_env(cpu, launched=True) == {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}
    assert placement.visible_gpus_env(auto, launched=False) == {"CUDA_VISIBLE_DEVICES": "3"}
    assert placement.visible_gpus_env(auto, launched=True) == {}
    monkeypatch.setattr(placement, "cuda_available", lambda: False)
    assert placement.visible_gpus_env(cpu, launched=False) == {}  # nothing to hide


def test_more_ranks_than_gpus_is_refused_before_the_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    import stages.io.deepspeed_config as launch
    from stages.io.config import ConfigError

    monkeypatch.setattr(placement, "cuda_available", lambda: True)
    monkeypatch.setattr(launch, "gpu_count", lambda: 1)
    cfg = load_config(None, ["reward.launcher=accelerate", "distributed.num_processes=2"])
    with pytest.raises(ConfigError, match=r"^reward.launcher: accelerate starts 2 ranks on this machine, one per GPU, "
                                          r"but it has 1 visible GPU\(s\)"):
        launch.check_launch("reward", cfg)
    launch.check_launch("reward", load_config(None, ["reward.launcher=accelerate", "distributed.num_processes=1"]))
    launch.check_launch("reward", load_config(None, ["reward.launcher=accelerate", "backbone.device=cpu"]))


def test_backbone_device_resolves_auto_cpu_and_cuda() -> None:
    """The one resolution every stage, the cache key and the memory plan use."""
    from stages.io.config import ConfigError

    auto, cpu, cuda = (load_config(None, [f"backbone.device={d}"]).backbone for d in ("auto", "cpu", "cuda"))
    assert placement.device_type(auto, cuda=True) == "cuda" and placement.device_type(auto, cuda=False) == "cpu"
    assert placement.device_type(cpu, cuda=True) == "cpu" and placement.device_type(cuda, cuda=True) == "cuda"
    with pytest.raises(ConfigError, match=r"^backbone.device: cuda, but no CUDA device is visible"):
        placement.device_type(cuda, cuda=False)
