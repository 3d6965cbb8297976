"""Learning-rate schedule: linear warmup, then cosine decay to a floor.

Steps are counted as in the training loop: ``step`` is the 1-based index of the optimizer step about to be
taken (the first update is step 1, the last is ``total_steps``). With ``W`` warmup steps, base rate
``lr`` and floor ``lr * min_lr_ratio``:

* ``1 <= step <= W``: ``lr * step / W`` (reaches ``lr`` exactly at step ``W``);
* ``W < step <= total_steps``: ``floor + (lr - floor) * (1 + cos(pi * (step - W) / (total_steps - W))) / 2``,
  which equals ``floor`` at the last step;
* past ``total_steps`` (a run extended without changing ``run.steps``): ``floor``.

The schedule is a pure function of the step, so resuming needs nothing but the step (the same choice as
nanoGPT's ``get_lr``).
"""

from __future__ import annotations

import math

__all__ = ["WarmupCosine", "lr_factor"]


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (1-based).

    Args:
        step: Index of the optimizer step about to be taken, starting at 1.
        warmup_steps: Number of linear-warmup steps (0 for none).
        total_steps: Step at which the cosine reaches its floor.
        min_lr_ratio: Floor of the cosine as a fraction of the base rate, in ``[0, 1]``.

    Returns:
        A factor in ``[0, 1]``.
    """
    if step < 1:
        raise ValueError(f"step counts from 1, got {step}")
    if warmup_steps > 0 and step <= warmup_steps:
        return step / warmup_steps
    if total_steps <= warmup_steps:
        return 1.0
    if step >= total_steps:
        return min_lr_ratio
    progress = (step - warmup_steps) / (total_steps - warmup_steps)  # in (0, 1)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """Sets the learning rate of every optimizer parameter group from the step.

    Each group keeps its own base rate (``group["base_lr"]``, written at construction from
    ``group["lr"]``), so groups with a scaled rate keep their ratio throughout the run.

    Args:
        optimizer: The optimizer whose groups are driven.
        warmup_steps: Linear-warmup steps.
        total_steps: Length of the schedule (``run.steps``).
        min_lr_ratio: Cosine floor as a fraction of each group's base rate.
    """

    def __init__(self, optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> None:
        self.optimizer = optimizer
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.min_lr_ratio = float(min_lr_ratio)
        self.last_step = 0
        for group in optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])

    def set_step(self, step: int) -> float:
        """Writes the rates for optimizer step ``step`` into the groups; returns the first group's rate."""
        factor = lr_factor(step, self.warmup_steps, self.total_steps, self.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        self.last_step = step
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, int | float]:
        """Primitive state for the checkpoint (loadable with ``weights_only=True``)."""
        return {
            "last_step": self.last_step,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "min_lr_ratio": self.min_lr_ratio,
        }

    def load_state_dict(self, state: dict[str, int | float]) -> None:
        """Restores the step counter; the shape of the schedule comes from the (possibly new) config."""
        self.last_step = int(state["last_step"])
