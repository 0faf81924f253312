"""The optimiser step shared by our own training loops (reward, RRHF): AdamW, warmup + cosine, clipping."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class Optimizer:
    """AdamW over ``params`` with linear warmup then cosine decay; ``step(loss)`` does one full update."""

    def __init__(self, params: list["torch.nn.Parameter"], learning_rate: float, warmup_steps: int,
                 total_steps: int, max_grad_norm: float = 1.0) -> None:
        import torch
        from transformers import get_cosine_schedule_with_warmup

        self.params = params
        self.max_grad_norm = max_grad_norm
        self.optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
        self.schedule = get_cosine_schedule_with_warmup(self.optimizer, warmup_steps, total_steps)

    def step(self, loss: "torch.Tensor") -> None:
        import torch

        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
