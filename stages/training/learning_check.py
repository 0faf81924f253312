"""Did the stage learn anything? A loud warning, never silence, when training moved nothing.

Three checks, for faults that end with exit 0 and an artifact no better than its starting point:
- trainable weights bit-identical to their initial values at the end (a learning rate stuck at 0 - the
  DeepSpeed schedule trap of issue 18 -, a frozen adapter, ``learning_rate: 0``);
- a training loss that does not move after the warm-up;
- a P-tuning v2 prefix at a learning rate too low for a prefix to learn (issue 19): such a prefix moves
  just enough to pass both checks above, so the rate itself is judged.
The stage keeps publishing (a user may want exactly that), but each warning is printed, stored in the
metrics under ``warnings`` and shown by ``rlhf report``, ``report.html`` and W&B.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from stages.registry import spec
from stages.training.distributed import LOCAL, Distributed, gathered

# A loss "has not moved" when the mean of its last logged values is within this fraction of the mean of
# its first ones (after warm-up). Real runs of every stage move their loss by >5% in a few dozen steps;
# batch-to-batch noise alone moves window means by far more than 0.1%, so this only fires when
# nothing at all changes the loss, such as a loop that recomputes one fixed batch with frozen weights.
FLAT_LOSS_RTOL = 1e-3
SOLVED_LOSS = 1e-3  # a loss already this close to 0 has nothing left to move: not judged
WINDOW = 3  # logged losses averaged at each end


class LearningCheck:
    """Snapshot of the trainable parameters at the start of training, compared with them at the end.

    Adapters are small (the backbone is frozen and not copied), so the snapshot is a plain CPU clone.
    Under ZeRO-3 the parameters are gathered for the comparison (every rank must call ``warnings``).
    A learning rate too low for the adapter kind is reported at once (printed) and again at the end.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        dist: Distributed = LOCAL,
        *,
        stage: str,
        adapter_kind: str = "lora",
        learning_rate: float | None = None,
    ) -> None:
        self.module, self.dist, self.stage = module, dist, stage
        self.rate_warning = _prefix_rate_warning(stage, adapter_kind, learning_rate)
        if self.rate_warning and dist.is_main:
            print(f"WARNING: {self.rate_warning}", flush=True)
        with self._whole():
            self.initial = {name: p.detach().cpu().clone() for name, p in self._trainable()}

    def _trainable(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        return ((name, p) for name, p in self.module.named_parameters() if p.requires_grad)

    @contextmanager
    def _whole(self) -> Iterator[None]:
        with gathered(self.dist, self.module):
            yield

    def changed_parameters(self) -> int:
        """How many trainable tensors differ (in any bit) from their values at the start."""
        with self._whole():
            return sum(not torch.equal(p.detach().cpu(), self.initial[name]) for name, p in self._trainable())

    def warnings(self, history: list[dict[str, Any]], warmup_steps: int = 0) -> list[str]:
        """The warnings for this stage's end of training (empty when it learned); each is also printed.

        ``history``: the logged rows (``step``, ``loss``) in order; rows up to ``warmup_steps`` are not
        judged. Pass ``[]`` for a stage whose loss is not meant to fall (PPO re-whitens every update).
        """
        found = [self.rate_warning] if self.rate_warning else []
        if not self.initial:
            found.append(f"{self.stage}: no trainable parameters: the adapter is frozen, nothing was trained")
        elif self.changed_parameters() == 0:
            found.append(
                f"{self.stage}: the trainable parameters are bit-identical to their initial values after "
                "training (learning rate 0, or the optimizer never stepped them): nothing was learned"
            )
        if flat := _flat_loss([row["loss"] for row in history if row["step"] > warmup_steps]):
            found.append(
                f"{self.stage}: the training loss has not moved after the warm-up ({flat}): nothing was learned"
            )
        if self.dist.is_main:
            for warning in found[1 if self.rate_warning else 0 :]:  # the rate warning was printed at the start
                print(f"WARNING: {warning}; the stage still publishes its artifact", flush=True)
        return found


def _flat_loss(losses: list[float]) -> str | None:
    """ "first -> last" window means when the loss has not moved, else None (also when too few to judge)."""
    if len(losses) < 2 * WINDOW:
        return None
    first, last = sum(losses[:WINDOW]) / WINDOW, sum(losses[-WINDOW:]) / WINDOW
    if abs(first) < SOLVED_LOSS or abs(last - first) > FLAT_LOSS_RTOL * abs(first):
        return None
    return f"{first:.5g} -> {last:.5g}"


def _prefix_rate_warning(stage: str, adapter_kind: str, learning_rate: float | None) -> str | None:
    floor = spec(stage).prefix_min_learning_rate  # on the built-in task SFT at 0.002 or 0.02 ended at 0.0
    if adapter_kind != "ptuning_v2" or learning_rate is None or not 0 < learning_rate < floor:
        return None
    return (
        f"{stage}: adapter.kind=ptuning_v2 at {stage}.learning_rate={learning_rate:g}: a prefix needs about "
        f"{floor:g} or more to learn (configs/ptuning_v2.yaml has rates that work)"
    )
