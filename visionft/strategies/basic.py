"""Strategies that train fixed sets of groups: from scratch, full fine-tuning, partial freezing."""
from __future__ import annotations

from dataclasses import dataclass

from visionft.errors import UsageError
from visionft.strategies.base import Strategy


@dataclass
class Scratch(Strategy):
    """Random init, every group trains, BatchNorm always learns its statistics."""

    lr: float = 2e-3
    bn: str = "train"

    uses_pretrained = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bn != "train":
            raise UsageError("strategy=scratch trains BatchNorm statistics from random init: "
                             "strategy.bn must be 'train'")


@dataclass
class Full(Strategy):
    """Full fine-tuning: every group trains from the first step (with ``layer_decay`` < 1: layer-wise LR)."""


@dataclass
class Partial(Strategy):
    """Freeze the first ``freeze_depth`` depth groups (input side), train the rest."""

    freeze_depth: int = 2

    def validate(self, n_groups: int) -> None:
        if not 0 <= self.freeze_depth <= n_groups - 1:
            raise UsageError(
                f"strategy.freeze_depth={self.freeze_depth} is out of range for this backbone: it has {n_groups} "
                f"depth groups (stem ... head), so freeze_depth must be in 0..{n_groups - 1}"
            )

    def open_epoch(self, index: int, n_groups: int) -> int | None:
        return None if index < self.freeze_depth else 0
