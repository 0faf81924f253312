"""``stages.training.updater.Updater`` on a fixed problem, run by ``tests/test_deepspeed.py`` twice: as 2 ranks of
an ``accelerate launch`` on DeepSpeed, and in one local process. Both must apply the same updates:
gradient accumulation (2), an explicit early boundary, a warmup + cosine schedule.

    python -m tests.updater_probe OUT.json [DEEPSPEED.json]
"""

from __future__ import annotations

import json
import sys

import torch

from stages.training.distributed import LOCAL, Distributed
from stages.training.updater import Updater

GLOBAL_BATCH = 8
MICRO_STEPS = 7
EARLY_BOUNDARY = 2  # updates after micro-steps (0, 1), (2: explicit boundary), (3, 4), (5, 6)


def trace(dist: Distributed) -> list[dict]:
    """Weights and applied learning rate after every micro-step."""
    torch.manual_seed(0)
    module = torch.nn.Linear(4, 1)
    inputs = torch.randn(MICRO_STEPS, GLOBAL_BATCH, 4, generator=torch.Generator().manual_seed(1))
    targets = inputs.sum(-1, keepdim=True)
    updater = Updater(
        module,
        0.05,
        warmup_steps=1,
        total_steps=4,
        gradient_accumulation=2,
        micro_batch_size=GLOBAL_BATCH // dist.world_size,
        dist=dist,
    )
    rows = []
    for micro in range(MICRO_STEPS):
        mine = slice(dist.rank, None, dist.world_size)  # this rank's share of the global batch
        loss = torch.nn.functional.mse_loss(module(inputs[micro, mine]), targets[micro, mine])
        updater.step(loss, boundary=micro == EARLY_BOUNDARY)
        weights = torch.cat([p.detach().flatten() for p in module.parameters()])
        rows.append({"weights": weights.tolist(), "applied_lr": updater.applied_lr})
    return rows


def main() -> None:
    out = sys.argv[1]
    dist = LOCAL
    if len(sys.argv) > 2:
        from accelerate import PartialState

        state = PartialState(backend="gloo")
        with open(sys.argv[2]) as f:
            dist = Distributed(rank=state.process_index, world_size=state.num_processes, deepspeed=json.load(f))
    rows = trace(dist)
    if dist.is_main:
        with open(out, "w") as f:
            json.dump(rows, f)
    dist.close()


if __name__ == "__main__":
    main()
