"""The reward model on the shared backbone, as every stage that reads it sees it: the ``reward`` adapter
plus a scalar score head (``stages.model.heads``), and the probe texts that prove a loaded copy scores
exactly as the reward stage did.

The reward stage (``stages.reward.recipe``) trains it and writes the probes; PPO, RRHF and GRPO load it with
``attach_reward`` and score their samples with ``reward_of``. It lives here, not in the reward recipe,
so that an edit to the reward stage's training loop leaves the RL stages' code versions (and caches) as
they are; an edit to how rewards are scored changes them all.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from stages.io.artifacts import ArtifactError
from stages.io.data import Record
from stages.model.adapters import active_adapter, load_adapter
from stages.model.heads import SCORE_HEAD, load_head, sequence_scores
from stages.model.placement import model_device
from stages.model.sequences import Response, from_token_ids
from stages.model.tokenization import Tokenization

if TYPE_CHECKING:
    from peft import PeftModel

ADAPTER_NAME = "reward"
PROBES = "probe_scores.json"  # the probe texts, their ids and their scores, in the reward artifact
PROBE_TOLERANCE = 1e-4


def probe_scores(
    model: PeftModel, head: torch.nn.Linear, tokenization: Tokenization, pairs: list[Record]
) -> list[dict[str, Any]]:
    """Held-out (prompt, response) texts with the ids they were scored on and their scores."""
    probes = [{"prompt": p["prompt"], "response": p[side]} for p in pairs for side in ("chosen", "rejected")]
    rows = [tokenization.pair(p["prompt"], p["response"]) for p in probes]
    with torch.no_grad():
        scores = sequence_scores(model, head, from_token_ids(rows, tokenization.pad_id, model_device(model)))
    return [
        {**probe, "ids": prompt + response, "score": score}
        for probe, (prompt, response), score in zip(probes, rows, scores.tolist())
    ]


def attach_reward(
    model: PeftModel | torch.nn.Module, folder: Path, tokenization: Tokenization, backbone_fingerprint: str
) -> tuple[PeftModel, torch.nn.Linear]:
    """Load a reward artifact onto the shared backbone as adapter ``reward`` plus its head, and prove it
    scores the reward stage's probe texts exactly as the reward stage did: the same token ids (the
    tokenization contract holds across the two stages), then the same scores."""
    model = load_adapter(model, folder, ADAPTER_NAME, backbone_fingerprint)
    head = load_head(
        Path(folder) / SCORE_HEAD, model.get_base_model().config.hidden_size, backbone_fingerprint, model_device(model)
    )
    probes = json.loads((Path(folder) / PROBES).read_text())
    rows = [tokenization.pair(p["prompt"], p["response"]) for p in probes]
    changed = [p for p, (prompt, response) in zip(probes, rows) if p["ids"] != prompt + response]
    if changed:
        raise ArtifactError(
            f"{folder}: this stage tokenizes the reward model's probe text {changed[0]['prompt']!r} + "
            f"{changed[0]['response']!r} into other ids than the reward stage did; the tokenizer or "
            "data.chat_template differs between the stages, so the rewards would be wrong"
        )
    with active_adapter(model, ADAPTER_NAME), torch.no_grad():
        scores = sequence_scores(model, head, from_token_ids(rows, tokenization.pad_id, model_device(model)))
    expected = torch.tensor([p["score"] for p in probes], device=scores.device)
    worst = (scores - expected).abs().max().item()
    if worst > PROBE_TOLERANCE:
        raise ArtifactError(
            f"{folder}: the loaded reward model scores its probe texts {worst:.2e} away from what the reward "
            f"stage computed (tolerance {PROBE_TOLERANCE}); the head or adapter does not match"
        )
    return model, head


def reward_of(
    model: PeftModel, head: torch.nn.Linear, samples: list[Response], pad_id: int, missing_eos_penalty: float
) -> list[float]:
    """Reward-model scores of sampled responses, on the ids that were sampled (reward adapter active),
    minus a penalty for responses that never stopped."""
    batch = from_token_ids([(list(s.prompt_ids), list(s.token_ids)) for s in samples], pad_id, model_device(model))
    with active_adapter(model, ADAPTER_NAME), torch.no_grad():
        scores = sequence_scores(model, head, batch).tolist()
    return [score - (0.0 if s.finished else missing_eos_penalty) for score, s in zip(scores, samples)]
