"""Callbacks the exact-resume tests inject into CLI runs (PYTHONPATH=tests): record every training batch, and kill
the process (SIGKILL, no cleanup) at a given point."""
from __future__ import annotations

import hashlib
import os
import signal

import lightning as L


class Recorder(L.Callback):
    """Appends `global_step epoch sha1(images) sha1(labels)` for every training batch to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        x, y = batch
        with open(self.path, "a") as f:
            f.write(f"{trainer.global_step} {trainer.current_epoch} "
                    f"{hashlib.sha1(x.cpu().numpy().tobytes()).hexdigest()} "
                    f"{hashlib.sha1(y.cpu().numpy().tobytes()).hexdigest()}\n")
            f.flush()
            os.fsync(f.fileno())


class Killer(L.Callback):
    """SIGKILL at the end of training batch ``step`` (global step after it), once: nothing is saved, nothing flushed."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
