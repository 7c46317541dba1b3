"""What the world's training loops share: resuming from a caller's checkpoint and the learning
rate schedule (each stage's loop lives with its model, in clip.py and diffusion.py)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

# Called after every step with (step, loss, model, optimizer): progress bars and checkpoints.
OnStep = Callable[[int, float, torch.nn.Module, torch.optim.Optimizer], None]


def resume(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict | None) -> int:
    """Loads ``state`` (``model``, ``optimizer``, ``step``) if given; the step to start from."""
    if state is None:
        return 0
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return state["step"]


def warmup_cosine(optimizer: torch.optim.Optimizer, steps: int, warmup: int, start: int):
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``steps``; positioned at
    ``start`` for a resumed run."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        done = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, done)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=start - 1)
