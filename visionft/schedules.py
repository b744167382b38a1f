"""LR schedule shapes, chosen by the Hydra group ``scheduler``: each maps (step in phase, phase length in optimizer
steps, optimizer steps per epoch) to a factor of every param group's base LR. ``visionft.optim.lr_lambdas``
composes the shape with each group's multiplier and its open/closed gate on one clock (``visionft.optim.Clock``),
so a strategy phase that restarts the schedule restarts it here."""
from __future__ import annotations

import math
from dataclasses import dataclass, field


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Linear warmup from 1/warmup_steps to 1 over ``warmup_steps`` optimizer steps, then cosine to min_lr_ratio."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _warmup(step: int, warmup_steps: int) -> float | None:
    return (step + 1) / warmup_steps if warmup_steps > 0 and step < warmup_steps else None


@dataclass
class WarmupCosine:
    warmup_epochs: float = 1.0  # linear warmup, in epochs (converted to optimizer steps)
    min_lr_ratio: float = 0.01  # cosine floor, as a fraction of each group's LR

    def __call__(self, step: int, total: int, steps_per_epoch: int) -> float:
        return warmup_cosine(step, total, int(round(self.warmup_epochs * steps_per_epoch)), self.min_lr_ratio)


@dataclass
class Constant:
    warmup_epochs: float = 0.0

    def __call__(self, step: int, total: int, steps_per_epoch: int) -> float:
        return _warmup(step, int(round(self.warmup_epochs * steps_per_epoch))) or 1.0


@dataclass
class Step:
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # fractions of the phase's steps
    gamma: float = 0.1  # LR x gamma at each milestone passed
    warmup_epochs: float = 0.0

    def __call__(self, step: int, total: int, steps_per_epoch: int) -> float:
        warm = _warmup(step, int(round(self.warmup_epochs * steps_per_epoch)))
        if warm is not None:
            return warm
        return self.gamma ** sum(step >= m * total for m in self.milestones)
