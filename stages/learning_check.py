"""Did the stage learn anything? A loud warning, never silence, when training moved nothing.

Two faults end with exit 0 and a published artifact that is no better than its starting point: trainable
weights that never change (a learning rate stuck at 0 - the DeepSpeed schedule trap of issue 18 -, a
frozen adapter, ``learning_rate: 0``) and a loss that does not move after the warm-up. The stage keeps
publishing (a user may want exactly that), but the warning is printed, stored in the metrics under
``warnings`` and shown by ``rlhf report`` and ``report.html``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from stages.distributed import LOCAL, Distributed, gathered

if TYPE_CHECKING:
    import torch

# A loss "has not moved" when the mean of its last logged values is within this fraction of the mean of
# its first ones (after warm-up). Real runs of every stage move their loss by >5% in a few dozen steps;
# batch-to-batch noise alone moves window means by far more than 0.1%, so this only fires when
# nothing at all changes the loss, such as a loop that recomputes one fixed batch with frozen weights.
FLAT_LOSS_RTOL = 1e-3
WINDOW = 3  # logged losses averaged at each end


class LearningCheck:
    """Snapshot of the trainable parameters at the start of training, compared with them at the end.

    Adapters are small (the backbone is frozen and not copied), so the snapshot is a plain clone. Under
    ZeRO-3 the parameters are gathered for the snapshot and the comparison.
    """

    def __init__(self, module: "torch.nn.Module", dist: Distributed = LOCAL) -> None:
        self.module, self.dist = module, dist
        with self._whole():
            self.initial = {name: p.detach().clone() for name, p in self._trainable()}

    def _trainable(self) -> Iterator[tuple[str, "torch.nn.Parameter"]]:
        return ((name, p) for name, p in self.module.named_parameters() if p.requires_grad)

    @contextmanager
    def _whole(self) -> Iterator[None]:
        with gathered(self.dist, self.module):
            yield

    def changed_parameters(self) -> int:
        """How many trainable tensors differ (in any bit) from their values at the start."""
        import torch

        with self._whole():
            return sum(not torch.equal(p.detach(), self.initial[name]) for name, p in self._trainable())

    def warnings(self, stage: str, losses: list[float], warmup_logged: int = 0) -> list[str]:
        """The warnings for this stage's end of training (empty when it learned); each is also printed.

        ``losses``: the logged training losses in order; ``warmup_logged``: how many of them fall in the
        warm-up and are not judged. Pass ``losses=[]`` for a stage whose loss is not meant to fall (PPO).
        """
        found = []
        if not self.initial:
            found.append(f"{stage}: no trainable parameters: the adapter is frozen, nothing was trained")
        elif self.changed_parameters() == 0:
            found.append(f"{stage}: the trainable parameters are bit-identical to their initial values after "
                         "training (learning rate 0, or the optimizer never stepped them): nothing was learned")
        judged = losses[warmup_logged:]
        if len(judged) >= 2 * WINDOW:
            first, last = sum(judged[:WINDOW]) / WINDOW, sum(judged[-WINDOW:]) / WINDOW
            if abs(last - first) <= FLAT_LOSS_RTOL * max(abs(first), 1e-12):
                found.append(f"{stage}: the training loss has not moved after the warm-up ({first:.5g} -> "
                             f"{last:.5g}): nothing was learned")
        if self.dist.is_main:
            for warning in found:
                print(f"WARNING: {warning}; the stage still publishes its artifact", flush=True)
        return found
