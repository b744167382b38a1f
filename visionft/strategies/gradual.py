"""Gradual unfreezing (ULMFiT): the head first, then one more group top-down every ``every_n_epochs`` or at explicit
``milestones``, down to ``max_depth`` groups (None = all)."""
from __future__ import annotations

from dataclasses import dataclass, field

from visionft.errors import UsageError
from visionft.strategies.base import Strategy


@dataclass
class GradualUnfreeze(Strategy):
    every_n_epochs: int = 1
    milestones: list[int] = field(default_factory=list)  # epoch at which the k-th group below the head opens
    max_depth: int | None = None  # how many groups end up trainable, head included; None = all
    rewarm: bool = False  # restart warmup and the schedule each time a group opens (each unfreeze is a phase)

    def validate(self, n_groups: int) -> None:
        if self.max_depth is not None and not 1 <= self.max_depth <= n_groups:
            raise UsageError(f"strategy.max_depth={self.max_depth} is out of range: this backbone has {n_groups} "
                             f"depth groups, so max_depth must be in 1..{n_groups} (or null for all)")
        if self.milestones and list(self.milestones) != sorted(self.milestones):
            raise UsageError(f"strategy.milestones={list(self.milestones)} must be increasing epochs")
        if self.every_n_epochs < 1:
            raise UsageError("strategy.every_n_epochs must be >= 1")

    def phase_starts(self, n_groups: int) -> list[int]:
        if not self.rewarm:
            return [0]
        return sorted({e for i in range(n_groups) if (e := self.open_epoch(i, n_groups)) is not None})

    def open_epoch(self, index: int, n_groups: int) -> int | None:
        k = n_groups - 1 - index  # 0 = head, 1 = the group below it, ...
        if self.max_depth is not None and k >= self.max_depth:
            return None
        if k == 0:
            return 0
        if self.milestones:
            return int(self.milestones[k - 1]) if k - 1 < len(self.milestones) else None
        return k * self.every_n_epochs
