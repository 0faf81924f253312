"""Resumable training checkpoints for long stages (PPO), kept beside the stage's future artifact.

``runs/<id>/.ppo.checkpoints/update-00010/`` holds the trainable adapters, extra tensors (value head,
optimizer), RNG states and a JSON state (update index, KL controller, history). Each checkpoint is
published atomically with a manifest naming the stage's cache key, so a rerun resumes only from a
finished checkpoint of the *same* stage configuration.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages import artifacts
from stages.adapters import save_adapter

if TYPE_CHECKING:
    from peft import PeftModel

STATE = "state.json"
TENSORS = "tensors.pt"


def checkpoint_root(out: Path) -> Path:
    """Hidden sibling of the artifact folder: the artifact itself only appears when finished."""
    return Path(out).parent / f".{Path(out).name}.checkpoints"


def save_checkpoint(root: Path, update: int, cache_key: str, model: "PeftModel", adapters: list[str],
                    tensors: dict[str, Any], state: dict[str, Any]) -> Path:
    """Write checkpoint ``update`` atomically, then drop older ones."""
    import torch

    final = Path(root) / f"update-{update:05d}"
    with artifacts.staging(final) as tmp:
        for name in adapters:
            save_adapter(model, name, tmp / name)
        rng = {"torch": torch.random.get_rng_state()}
        torch.save({**tensors, "rng": rng}, tmp / TENSORS)
        artifacts.write_json(tmp / STATE, state)
        artifacts.publish(tmp, final, {"kind": "checkpoint", "update": update, "cache_key": cache_key})
    for older in Path(root).glob("update-*"):
        if older != final:
            shutil.rmtree(older, ignore_errors=True)
    return final


def latest_checkpoint(root: Path, cache_key: str) -> Path | None:
    """The newest finished checkpoint written by a run with this cache key, if any."""
    found = [
        folder for folder in Path(root).glob("update-*")
        if artifacts.is_finished(folder) and artifacts.read_manifest(folder).get("cache_key") == cache_key
    ]
    return max(found, key=lambda f: artifacts.read_manifest(f)["update"], default=None)


def load_checkpoint(folder: Path, model: "PeftModel", adapters: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load the adapters' weights in place; return (extra tensors, JSON state). RNG state is restored."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    for name in adapters:
        weights = load_file(str(Path(folder) / name / "adapter_model.safetensors"))
        set_peft_model_state_dict(model, weights, adapter_name=name)
    tensors = torch.load(Path(folder) / TENSORS, weights_only=True)
    torch.random.set_rng_state(tensors.pop("rng")["torch"])
    return tensors, json.loads((Path(folder) / STATE).read_text())
