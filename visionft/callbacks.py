"""Small callbacks: training throughput (images/s over training batches only), a per-epoch NaN guard, and
preemption (SIGTERM, Ctrl+C) turned into a resumable checkpoint."""
from __future__ import annotations

import math
import signal
import threading
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException


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


class Interrupted(RuntimeError):
    """Training stopped by a signal; a resumable checkpoint was saved."""

    def __init__(self, message: str, signal_name: str) -> None:
        super().__init__(message)
        self.exit_code = 128 + int(getattr(signal, signal_name))


class Preemption(L.Callback):
    """SIGTERM (a scheduler's preemption) and a first Ctrl+C stop training at the next batch boundary (a second
    Ctrl+C stops at once); ``last.ckpt`` is then saved mid-epoch, so ``resume=true`` continues from that step."""

    def __init__(self) -> None:
        self.signal_name, self.saved, self._previous = "SIGTERM", None, None

    def on_fit_start(self, trainer, pl_module) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def stop_soon(signum, frame):
            if self.signal_name == "SIGINT":  # pressed twice: stop now
                raise KeyboardInterrupt
            self.signal_name = "SIGINT"
            trainer._signal_connector.received_sigterm = True  # Lightning's loops stop at the next batch boundary

        self._previous = signal.signal(signal.SIGINT, stop_soon)

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def on_fit_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()
        if isinstance(exception, SIGTERMException):
            path = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
            trainer.save_checkpoint(path)
            self.saved = path
