"""Small callbacks: training throughput (images/s over training batches only) and a per-epoch NaN guard."""
from __future__ import annotations

import math
import time

import lightning as L
import torch


class NonFiniteLoss(RuntimeError):
    pass


def _now() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


class TrainThroughput(L.Callback):
    """Counts training images and the seconds spent in training epochs, validation excluded. Syncs the device at
    epoch and validation boundaries only."""

    def __init__(self) -> None:
        self.images, self.seconds, self._t = 0, 0.0, None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t = _now()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.images += int(batch[0].shape[0])

    def on_validation_start(self, trainer, pl_module) -> None:
        if self._t is not None:
            self.seconds += _now() - self._t
            self._t = None

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.training:
            self._t = _now()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._t is not None:
            self.seconds += _now() - self._t
            self._t = None

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


class NanGuard(L.Callback):
    """Stops with a clear error when the epoch's mean training loss is not finite (one host sync per epoch)."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise NonFiniteLoss(
                f"training loss is {float(loss)} in epoch {trainer.current_epoch}: lower strategy.lr, set "
                f"trainer.gradient_clip_val=1.0, or use trainer.precision=32-true"
            )
