"""Scalar heads on the shared backbone's hidden states: the reward model's score head, PPO's value head.

A head is one ``Linear(hidden, 1)`` saved beside its adapter as safetensors, with metadata naming the
backbone it belongs to. Loading checks the file exists and fits, so a lost or mismatched head is a clear
error rather than a silently re-initialised one (TRL #1379, OpenRLHF #1342).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from stages.io.artifacts import ArtifactError, storage_error
from stages.model.sequences import SequenceBatch, last_hidden_states

SCORE_HEAD = "score_head.safetensors"


def new_head(hidden_size: int, seed: int, device: torch.device | str) -> torch.nn.Linear:
    """A zero-bias fp32 linear head on ``device`` with small deterministic init (scores start near 0).
    The init is drawn on the CPU, so a seed gives the same head on every device."""
    generator = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(hidden_size, 1, device=device)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator, device="cpu") / hidden_size**0.5)
        head.bias.zero_()
    return head


def save_head(head: torch.nn.Linear, path: Path, backbone_fingerprint: str) -> None:
    tensors = {"weight": head.weight.detach().cpu().contiguous(), "bias": head.bias.detach().cpu().contiguous()}
    try:
        save_file(tensors, str(path), metadata={"backbone_fingerprint": backbone_fingerprint})
    except SafetensorError as err:  # a full disk arrives as a Rust error; give it back its errno
        raise storage_error(err, path) from err


def load_head(path: Path, hidden_size: int, backbone_fingerprint: str, device: torch.device | str) -> torch.nn.Linear:
    """Load a saved head onto ``device``; missing file, wrong shape or another backbone's head are errors."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: score/value head is missing; the artifact is incomplete, rerun its stage")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except SafetensorError as err:
        raise ArtifactError(f"{path}: not a readable safetensors file ({err}); rerun the stage that wrote it") from None
    if metadata.get("backbone_fingerprint") != backbone_fingerprint:
        raise ArtifactError(
            f"{path}: head belongs to backbone {metadata.get('backbone_fingerprint')}, not {backbone_fingerprint}"
        )
    if set(tensors) != {"weight", "bias"} or tuple(tensors["weight"].shape) != (1, hidden_size):
        found = {name: tuple(t.shape) for name, t in tensors.items()}
        raise ArtifactError(f"{path}: expected a Linear({hidden_size}, 1) head, found {found}")
    head = torch.nn.Linear(hidden_size, 1, device=device)
    head.load_state_dict(tensors)
    head.requires_grad_(False)
    return head


def sequence_scores(model: torch.nn.Module, head: torch.nn.Linear, batch: SequenceBatch) -> torch.Tensor:
    """One scalar per sequence from the last real token's hidden state: (B,)."""
    hidden = last_hidden_states(model, batch)  # (B, H)
    return head(hidden.to(head.weight.dtype)).squeeze(-1)
