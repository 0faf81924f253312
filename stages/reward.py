"""Reward modelling: a ``reward`` adapter plus a scalar score head, trained with the Bradley-Terry loss.

    python -m stages.reward --out runs/manual/reward [--config ...] [--set reward.max_steps=50]

Why not TRL's RewardTrainer: it needs an ``AutoModelForSequenceClassification``, a second object around
the backbone. Our reward is the causal LM's own final hidden state at the last token (reward adapter
active) through a ``Linear(hidden, 1)`` head, the exact path PPO and RRHF score with later on the one
shared backbone. The loop is small: encode pairs, score both sides, ``pairwise_reward_loss``, step.

Artifact: ``adapter/`` (PEFT), ``score_head.safetensors``, ``probe_scores.json`` (scores of held-out
texts, which every later stage re-computes to prove the head it loaded is the one trained here).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages import runner
from stages.adapters import active_adapter, attach_adapter, count_trainable, load_adapter, needs_4bit, save_adapter
from stages.artifacts import ArtifactError, write_json
from stages.backbone import load_backbone
from stages.checkpoints import Checkpointer
from stages.config import PipelineConfig
from stages.data import Record, load_records, measure_lengths
from stages.distributed import gathered
from stages.heads import SCORE_HEAD, load_head, new_head, save_head, sequence_scores
from stages.learning_check import LearningCheck
from stages.losses import pairwise_reward_loss
from stages.optim import Optimizer
from stages.sequences import encode

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

ADAPTER_NAME = "reward"
PROBES = "probe_scores.json"
PROBE_TOLERANCE = 1e-4


def split_pairs(pairs: list[Record], eval_fraction: float) -> tuple[list[Record], list[Record]]:
    """Hold out whole prompts (by a hash of the prompt), so held-out accuracy measures generalisation."""
    def held_out(prompt: str) -> bool:
        return int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) % 1000 < eval_fraction * 1000

    train = [p for p in pairs if not held_out(p["prompt"])]
    held = [p for p in pairs if held_out(p["prompt"])]
    if not train or not held:
        raise ArtifactError(f"reward.eval_fraction={eval_fraction} leaves {len(train)} train / {len(held)} held-out pairs")
    return train, held


def score_pairs(model: "PeftModel", head: "torch.nn.Linear", tokenizer: "PreTrainedTokenizerBase",
                pairs: list[Record]) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(chosen scores, rejected scores), each (B,), in one forward over both sides."""
    prompts = [p["prompt"] for p in pairs]
    batch = encode(tokenizer, prompts + prompts, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs])
    scores = sequence_scores(model, head, batch)  # (2B,)
    return scores[: len(pairs)], scores[len(pairs) :]


def evaluate_pairs(model: "PeftModel", head: "torch.nn.Linear", tokenizer: "PreTrainedTokenizerBase",
                   pairs: list[Record], batch_size: int = 64) -> dict[str, float]:
    import torch

    chosen, rejected = [], []
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            c, r = score_pairs(model, head, tokenizer, pairs[start : start + batch_size])
            chosen.append(c)
            rejected.append(r)
    margin = torch.cat(chosen) - torch.cat(rejected)
    return {"pair_accuracy": (margin > 0).float().mean().item(), "reward_margin": margin.mean().item()}


def train_reward(cfg: PipelineConfig, ctx: runner.StageContext) -> dict[str, Any]:
    import torch
    from tqdm.auto import tqdm

    out, dist, rm = ctx.staging, ctx.dist, cfg.reward
    backbone = load_backbone(cfg.backbone, quantize_4bit=needs_4bit(cfg.adapter.kind))
    tokenizer = backbone.tokenizer
    pairs = load_records(cfg.data.preferences, "preferences", cfg.task)
    context = backbone.model.config.max_position_embeddings
    if dist.is_main and (warning := measure_lengths(pairs, "preferences", cfg.data.preferences, tokenizer, context).warning()):
        print(f"warning: {warning}; pairs are scored whole, past the backbone's {context}-token context", flush=True)
    train, held = split_pairs(pairs, rm.eval_fraction)
    model = attach_adapter(backbone.model, cfg.adapter, ADAPTER_NAME)
    head = new_head(backbone.model.config.hidden_size, cfg.run.seed)
    trainable = count_trainable(model) + sum(p.numel() for p in head.parameters())
    trained = torch.nn.ModuleDict({"model": model, "head": head})
    learning = LearningCheck(trained, dist, stage="reward", adapter_kind=cfg.adapter.kind, learning_rate=rm.learning_rate)
    optimizer = Optimizer(trained, rm.learning_rate, rm.warmup_steps,
                          rm.max_steps, micro_batch_size=rm.batch_size, dist=dist, bf16=cfg.backbone.dtype == "bfloat16")
    checkpointer = Checkpointer(ctx.final, ctx.cache_key, optimizer, model, [ADAPTER_NAME], {"score_head": head},
                                backbone.fingerprint, dist)
    state = checkpointer.resume() or {"step": 0, "history": []}
    start, history = state["step"], state["history"]
    batches = pair_batches(len(train), rm.batch_size * dist.world_size, cfg.run.seed)
    for _ in range(start):  # the batches the checkpointed steps already used
        next(batches)
    model.train()
    for step in tqdm(range(start + 1, rm.max_steps + 1), desc="reward", unit="step", initial=start, total=rm.max_steps):
        batch = dist.shard([train[i] for i in next(batches)])  # every rank draws the global batch, trains its share
        chosen, rejected = score_pairs(model, head, tokenizer, batch)
        loss = pairwise_reward_loss(chosen, rejected)
        optimizer.step(loss, what=f"reward loss at step {step}")
        if step % rm.logging_steps == 0 or step == rm.max_steps:
            accuracy = dist.mean((chosen > rejected).float().mean().item())
            history.append({"step": step, "loss": round(dist.mean(loss.item()), 5), "accuracy": accuracy,
                            "learning_rate": optimizer.applied_lr})
        checkpointer.maybe_save(step, rm.checkpoint_every, rm.max_steps, {"history": history})
    model.eval()
    metrics = evaluate_pairs(model, head, tokenizer, held)
    probes = _probe_scores(model, head, tokenizer, held[:8])

    with gathered(dist, optimizer.module):
        save_adapter(model, ADAPTER_NAME, out / "adapter")
        save_head(head, out / SCORE_HEAD, backbone.fingerprint)
    write_json(out / PROBES, probes)
    write_json(out / "history.json", history)
    return {
        **metrics,
        "warnings": learning.warnings(history, rm.warmup_steps),
        "train_loss": history[-1]["loss"],
        "train_pairs": len(train),
        "eval_pairs": len(held),
        "trainable_parameters": trainable,
        "adapter_kind": cfg.adapter.kind,
        "resumed_from_step": start,
    }


def pair_batches(count: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Indices of successive batches: shuffled epochs, batches may straddle two epochs."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            order += torch.randperm(count, generator=generator).tolist()
        yield order[:batch_size]
        del order[:batch_size]


def _probe_scores(model: "PeftModel", head: "torch.nn.Linear", tokenizer: "PreTrainedTokenizerBase",
                  pairs: list[Record]) -> list[dict[str, Any]]:
    import torch

    probes = [{"prompt": p["prompt"], "response": p[side]} for p in pairs for side in ("chosen", "rejected")]
    with torch.no_grad():
        scores = sequence_scores(model, head, encode(tokenizer, [p["prompt"] for p in probes],
                                                     [p["response"] for p in probes]))
    return [{**probe, "score": score} for probe, score in zip(probes, scores.tolist())]


def attach_reward(model: "PeftModel | torch.nn.Module", folder: Path, tokenizer: "PreTrainedTokenizerBase",
                  backbone_fingerprint: str) -> tuple["PeftModel", "torch.nn.Linear"]:
    """Load a reward artifact onto the shared backbone as adapter ``reward`` plus its head, and prove it
    scores the reward stage's probe texts exactly as the reward stage did."""
    import torch

    model = load_adapter(model, folder, ADAPTER_NAME, backbone_fingerprint)
    head = load_head(Path(folder) / SCORE_HEAD, model.get_base_model().config.hidden_size, backbone_fingerprint)
    probes = json.loads((Path(folder) / PROBES).read_text())
    with active_adapter(model, ADAPTER_NAME), torch.no_grad():
        batch = encode(tokenizer, [p["prompt"] for p in probes], [p["response"] for p in probes])
        scores = sequence_scores(model, head, batch)
    expected = torch.tensor([p["score"] for p in probes])
    worst = (scores - expected).abs().max().item()
    if worst > PROBE_TOLERANCE:
        raise ArtifactError(
            f"{folder}: the loaded reward model scores its probe texts {worst:.2e} away from what the reward "
            f"stage computed (tolerance {PROBE_TOLERANCE}); the head or adapter does not match"
        )
    return model, head


def reward_of(model: "PeftModel", head: "torch.nn.Linear", tokenizer: "PreTrainedTokenizerBase", prompts: list[str],
              responses: list[str], finished: list[bool], missing_eos_penalty: float) -> list[float]:
    """Reward-model scores (reward adapter active), minus a penalty for responses that never stopped."""
    import torch

    with active_adapter(model, ADAPTER_NAME), torch.no_grad():
        scores = sequence_scores(model, head, encode(tokenizer, prompts, responses, finished)).tolist()
    return [s - (0.0 if done else missing_eos_penalty) for s, done in zip(scores, finished)]


def main(argv: list[str] | None = None) -> None:
    runner.stage_main("reward", train_reward, argv)


if __name__ == "__main__":
    main()
