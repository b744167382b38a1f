"""A callback the signal tests inject into CLI runs (PYTHONPATH=tests): slow training batches, so that signals sent
from outside land inside one batch."""
from __future__ import annotations

import time
from pathlib import Path

import lightning as L


class SlowBatches(L.Callback):
    """From epoch ``epoch`` on, every training batch first touches ``marker`` (the test's cue) and sleeps
    ``seconds``."""

    def __init__(self, marker: str, epoch: int = 0, seconds: float = 5.0) -> None:
        self.marker, self.epoch, self.seconds = Path(marker), epoch, seconds

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch >= self.epoch:
            self.marker.touch()
            time.sleep(self.seconds)
