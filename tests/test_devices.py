"""Device placement, checked on a CPU-only machine (issue 14, fault 10).

Every tensor a stage makes for its model must be made on the model's device. ``ForeignDefaultDevice``
(``tests/device_double.py``) moves the default device of project code away from the model's, as a GPU
run does; a stage that forgets a ``device=`` then fails here exactly where it would fail on CUDA. The
real CUDA run is ``tests/test_gpu.py`` (``bench/gpu_check.sh``), skipped where no GPU is.
"""

from pathlib import Path

import pytest
import torch

import stages.io.devices as devices
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
    """Every stage of the chain, each with the default device moved off the model's: every batch, head,
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
    monkeypatch.setattr(devices, "cuda_available", lambda: True)  # as on a GPU machine
    assert key("auto") == key("cuda") != key("cpu")


def test_what_each_stage_process_sees_of_the_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU machine (its probe faked): ``cpu`` hides every GPU from accelerate and DeepSpeed, a local
    stage sees one (the first visible), and accelerate ranks see them all (one each, by LOCAL_RANK)."""
    monkeypatch.setattr(devices, "cuda_available", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    cpu, auto = (load_config(None, [f"backbone.device={d}"]).backbone for d in ("cpu", "auto"))
    assert devices.visible_gpus_env(cpu, launched=False) == {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}
    assert devices.visible_gpus_env(cpu, launched=True) == {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}
    assert devices.visible_gpus_env(auto, launched=False) == {"CUDA_VISIBLE_DEVICES": "3"}
    assert devices.visible_gpus_env(auto, launched=True) == {}
    monkeypatch.setattr(devices, "cuda_available", lambda: False)
    assert devices.visible_gpus_env(cpu, launched=False) == {}  # nothing to hide


def test_more_ranks_than_gpus_is_refused_before_the_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    import stages.io.deepspeed_config as launch
    from stages.io.config import ConfigError

    monkeypatch.setattr(devices, "cuda_available", lambda: True)
    monkeypatch.setattr(launch, "gpu_count", lambda: 1)
    cfg = load_config(None, ["reward.launcher=accelerate", "distributed.num_processes=2"])
    with pytest.raises(
        ConfigError,
        match=r"^reward.launcher: accelerate starts 2 ranks on this machine, one per GPU, "
        r"but it has 1 visible GPU\(s\)",
    ):
        launch.check_launch("reward", cfg)
    launch.check_launch("reward", load_config(None, ["reward.launcher=accelerate", "distributed.num_processes=1"]))
    launch.check_launch("reward", load_config(None, ["reward.launcher=accelerate", "backbone.device=cpu"]))


def test_backbone_device_resolves_auto_cpu_and_cuda() -> None:
    """The one resolution every stage, the cache key and the memory plan use."""
    from stages.io.config import ConfigError

    auto, cpu, cuda = (load_config(None, [f"backbone.device={d}"]).backbone for d in ("auto", "cpu", "cuda"))
    assert devices.device_type(auto, cuda=True) == "cuda" and devices.device_type(auto, cuda=False) == "cpu"
    assert devices.device_type(cpu, cuda=True) == "cpu" and devices.device_type(cuda, cuda=True) == "cuda"
    with pytest.raises(ConfigError, match=r"^backbone.device: cuda, but no CUDA device is visible"):
        devices.device_type(cuda, cuda=False)


def test_auto_threads_take_the_cores_other_processes_leave_free() -> None:
    """run.threads=auto (issue 15, item 3): one thread per free core, at least one; a number is kept."""
    from stages.io.devices import stage_threads

    assert stage_threads("auto", cores=2, busy=0.1) == 2  # a quiet machine: every core
    assert stage_threads("auto", cores=2, busy=1.9) == 1  # beside a 2-thread training job
    assert stage_threads("auto", cores=2, busy=7.0) == 1  # never none
    assert stage_threads("auto", cores=16, busy=4.2) == 12
    assert stage_threads(3, cores=2, busy=2.0) == 3  # an explicit count is the user's call


def test_busy_cores_sees_a_process_spinning_on_a_core() -> None:
    """The measurement behind ``auto`` is real: a child spinning on one core counts as (about) one busy core."""
    import subprocess
    import sys
    import time

    from stages.io.devices import busy_cores

    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # past the interpreter's start
        assert busy_cores(window_s=0.5) >= 0.7
    finally:
        spinner.kill()
        spinner.wait()


def test_a_local_stage_runs_with_the_threads_auto_chose(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    """The runner applies ``auto``'s choice to torch and says so (busy cores stubbed: one core left free)."""
    monkeypatch.setattr(devices, "busy_cores", lambda window_s=0.1: devices.available_cores() - 1)
    seen: list[int] = []

    def probe(cfg, ctx):  # a stage that only records what it ran with
        seen.append(torch.get_num_threads())
        return {"threads": float(seen[0])}

    before = torch.get_num_threads()
    try:
        execute("sft", probe, load_config(None, [*TINY, "run.threads=auto"]), tmp_path / "sft", {})
    finally:
        torch.set_num_threads(before)
    assert seen == [1]
    assert "sft: 1 torch thread(s) of" in capsys.readouterr().err
