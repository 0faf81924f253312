"""Resumable checkpoints of our training loops (reward, RRHF, PPO), kept beside the stage's future artifact.

``runs/<id>/.reward.checkpoints/step-000040/`` holds the trainable adapters (PEFT folders), extra
tensors (heads), the optimizer (``Updater.save``: a local state file or the DeepSpeed engine's
partitions), every rank's random state (torch's global CPU and CUDA generators and the loop's own
batch samplers, so batches and dropout masks replay exactly after a resume) and a JSON state (step,
history, ...). Each checkpoint is published atomically with a manifest naming the stage's cache key,
so a rerun resumes only from a finished checkpoint of the *same* stage configuration, and a checkpoint
cut short by a kill is ignored.
SFT checkpoints are the HF Trainer's own (``.sft.checkpoints/checkpoint-N``), see ``stages.sft.recipe``.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from stages.io import artifacts
from stages.model.adapters import checkpoint_shapes, save_adapter
from stages.model.heads import load_head, save_head
from stages.model.placement import model_device
from stages.training.distributed import LOCAL, Distributed

if TYPE_CHECKING:
    from peft import PeftModel

    from stages.training.updater import Updater

STATE = "state.json"
# What draws a loop's batches: a torch.Generator, a random.Random, or an object with state_dict().
Sampler = Any
PREFIX = "step-"


def checkpoint_root(out: Path) -> Path:
    """Hidden sibling of the artifact folder: the artifact itself only appears when finished."""
    return Path(out).parent / f".{Path(out).name}.checkpoints"


class Checkpointer:
    """Saves and restores one stage's training state: its trainable adapters, heads and updater, and per
    rank torch's CPU and CUDA generators and the training loop's samplers (``save``/``resume`` take them)."""

    def __init__(
        self,
        final: Path,
        cache_key: str,
        updater: Updater,
        model: PeftModel,
        adapters: list[str],
        heads: dict[str, torch.nn.Linear],
        fingerprint: str,
        dist: Distributed = LOCAL,
    ) -> None:
        self.root = checkpoint_root(final)
        self.cache_key, self.updater, self.dist = cache_key, updater, dist
        self.model, self.adapters, self.heads, self.fingerprint = model, adapters, heads, fingerprint

    def resume(self, samplers: dict[str, Sampler] | None = None) -> dict[str, Any] | None:
        """Restore the newest finished checkpoint of this cache key, ``samplers`` included (in place);
        return its JSON state (None: start fresh)."""
        folder = latest_checkpoint(self.root, self.cache_key)
        if folder is None:
            return None
        self.updater.load(folder)  # under DeepSpeed this restores the trainable weights too
        if self.dist.deepspeed is None:
            load_adapter_weights(folder, self.model, self.adapters)
            for name, head in self.heads.items():
                path = folder / f"{name}.safetensors"
                head.load_state_dict(
                    load_head(path, head.in_features, self.fingerprint, head.weight.device).state_dict()
                )
        rng = torch.load(folder / f"rng-{self.dist.rank}.pt", weights_only=True)
        torch.random.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None:  # dropout on a GPU draws from that GPU's generator
            torch.cuda.set_rng_state(rng["cuda"], model_device(self.model))
        for name, sampler in (samplers or {}).items():
            restore_sampler(sampler, rng["samplers"][name])
        print(f"resuming from {folder}", flush=True)
        return json.loads((folder / STATE).read_text())

    def maybe_save(
        self, step: int, every: int, total: int, state: dict[str, Any], samplers: dict[str, Sampler] | None = None
    ) -> None:
        """Checkpoint every ``every`` steps (not after the last: the artifact follows at once)."""
        if step % every == 0 and step < total:
            self.save(step, state, samplers)

    def save(self, step: int, state: dict[str, Any], samplers: dict[str, Sampler] | None = None) -> Path:
        """Write checkpoint ``step`` atomically (every rank takes part), then drop older ones."""
        final = self.root / f"{PREFIX}{step:06d}"
        tmp = self.root / f".{final.name}.partial"  # one name all ranks agree on
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.dist.barrier()
        self.updater.save(tmp)
        torch.save(
            {
                "torch": torch.random.get_rng_state(),
                "cuda": _cuda_rng_state(self.model),
                "samplers": {name: sampler_state(s) for name, s in (samplers or {}).items()},
            },
            tmp / f"rng-{self.dist.rank}.pt",
        )
        if self.dist.is_main:
            if self.dist.deepspeed is None:  # DeepSpeed's own checkpoint already holds the trainable weights
                with checkpoint_shapes(self.model):
                    for name in self.adapters:
                        save_adapter(self.model, name, tmp / name)
                for name, head in self.heads.items():
                    save_head(head, tmp / f"{name}.safetensors", self.fingerprint)
            artifacts.write_json(tmp / STATE, {**state, "step": step})
        self.dist.barrier()
        if self.dist.is_main:
            artifacts.publish(tmp, final, {"kind": "checkpoint", "step": step, "cache_key": self.cache_key})
            for older in self.root.glob(f"{PREFIX}*"):
                if older != final:
                    shutil.rmtree(older, ignore_errors=True)
        self.dist.barrier()
        return final


def _cuda_rng_state(model: torch.nn.Module) -> torch.Tensor | None:
    """The generator state of the GPU the model is on (None on the CPU): what its dropout draws from.
    Only that one: a resume may see another number of GPUs."""
    device = model_device(model)
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def latest_checkpoint(root: Path, cache_key: str) -> Path | None:
    """The newest finished checkpoint written by a run with this cache key, if any."""
    found = [
        folder
        for folder in Path(root).glob(f"{PREFIX}*")
        if artifacts.is_finished(folder) and artifacts.read_manifest(folder).get("cache_key") == cache_key
    ]
    return max(found, key=lambda f: artifacts.read_manifest(f)["step"], default=None)


def load_adapter_weights(folder: Path, model: PeftModel, names: list[str]) -> None:
    """Load the checkpoint's copy of each named adapter into the model in place."""
    with checkpoint_shapes(model):
        for name in names:
            set_peft_model_state_dict(
                model, load_file(str(Path(folder) / name / "adapter_model.safetensors")), adapter_name=name
            )


def sampler_state(sampler: Sampler) -> Any:
    """The state a sampler resumes from: torch.Generator and random.Random, or ``state_dict()``."""
    if isinstance(sampler, torch.Generator):
        return sampler.get_state()
    if isinstance(sampler, random.Random):
        return sampler.getstate()
    return sampler.state_dict()


def restore_sampler(sampler: Sampler, state: Any) -> None:
    """Put ``sampler`` back where ``sampler_state`` found it."""
    if isinstance(sampler, torch.Generator):
        sampler.set_state(state)
    elif isinstance(sampler, random.Random):
        sampler.setstate(state)
    else:
        sampler.load_state_dict(state)
