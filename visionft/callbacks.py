"""Small callbacks: training throughput (images/s over training batches only), a divergence guard, preemption
(SIGTERM, Ctrl+C) turned into a resumable checkpoint, Lightning's EMA restricted to floating-point tensors, and a
logging cadence that reaches every epoch."""
from __future__ import annotations

import math
import signal
import threading
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.optim.swa_utils import get_ema_avg_fn

from visionft.divergence import NanGuard, NonFiniteLoss, saved_position  # noqa: F401  (the run's callbacks, in one place)


def ema_of_floats(decay: float):
    """torch's EMA update for floating-point tensors; integer tensors (the packed weights of a quantized frozen base,
    BatchNorm's batch counter) are copied: averaging them would truncate into their dtype."""
    ema = get_ema_avg_fn(decay)

    def update(averaged: torch.Tensor, current: torch.Tensor, num_averaged) -> torch.Tensor:
        return ema(averaged, current, num_averaged) if averaged.is_floating_point() else current

    return update


class EMA(EMAWeightAveraging):
    """Lightning's ``EMAWeightAveraging`` (same options), averaging floating-point tensors only."""

    def __init__(self, decay: float = 0.999, **kwargs) -> None:
        super().__init__(decay=decay, **kwargs)
        self._kwargs["avg_fn"] = ema_of_floats(decay)


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


class LogEveryEpoch(L.Callback):
    """``trainer.log_every_n_steps`` capped at the optimizer steps of one epoch (training batches over
    ``accumulate_grad_batches``, rounded up), so that step-wise logs such as the learning rate (LearningRateMonitor)
    reach the loggers in every epoch however small the data."""

    def __init__(self) -> None:
        self.configured: int | None = None

    def on_train_start(self, trainer, pl_module) -> None:  # the training loader's length is known here
        if self.configured is None:
            self.configured = trainer.log_every_n_steps
        batches = trainer.num_training_batches
        if self.configured and 0 < batches < math.inf:
            steps = math.ceil(batches / trainer.accumulate_grad_batches)
            trainer.log_every_n_steps = max(1, min(self.configured, steps))


class Interrupted(RuntimeError):
    """Training stopped by a signal; the message names the checkpoint ``resume=true`` continues from, if any."""

    def __init__(self, message: str, signal_name: str) -> None:
        super().__init__(message)
        self.exit_code = 128 + int(getattr(signal, signal_name))


class Preemption(L.Callback):
    """SIGTERM (a scheduler's preemption) and a first Ctrl+C stop training at the next batch boundary; ``last.ckpt``
    is then saved mid-epoch, so ``resume=true`` continues from that step. A second Ctrl+C stops at once, saving
    nothing (the step under way is unfinished): ``resume=true`` then continues from the last ``last.ckpt`` saved, if
    any. A Ctrl+C while that checkpoint is being written is ignored: the write finishes. After a stopped fit,
    ``interrupted(run, trainer)`` is the ``Interrupted`` to raise."""

    def __init__(self) -> None:
        self.signal_name, self.saved, self._previous = "SIGTERM", None, None
        self.at_once, self._saving, self._outside, self._stop_sent = False, False, None, False

    def on_fit_start(self, trainer, pl_module) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        self._outside = signal.getsignal(signal.SIGTERM)  # Lightning installs its own after this hook, until teardown

        def stop_soon(signum, frame):
            if self._saving:
                return
            if self.signal_name == "SIGINT":  # pressed twice: stop now (Lightning then exits: SystemExit)
                self.at_once = True
                raise KeyboardInterrupt
            self.signal_name = "SIGINT"
            if signal.getsignal(signal.SIGTERM) is not self._outside:  # else on_train_start sends it
                self._stop()

        self._previous = signal.signal(signal.SIGINT, stop_soon)

    def _stop(self) -> None:
        """Lightning's own SIGTERM handler marks the stop (``trainer.received_sigterm``): its loops stop at the next
        batch boundary and raise ``SIGTERMException``, as on a scheduler's SIGTERM."""
        self._stop_sent = True
        signal.raise_signal(signal.SIGTERM)

    def on_train_start(self, trainer, pl_module) -> None:  # a Ctrl+C while the checkpoint to resume was restored
        if self.signal_name == "SIGINT" and not self._stop_sent and not trainer.received_sigterm:
            self._stop()

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def on_fit_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        if isinstance(exception, KeyboardInterrupt):
            return  # Lightning ignores Ctrl+C while it shuts down; interrupted() restores the handler
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit":
            path = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
            # the full training state (optimizer, loops, callbacks), which resume=true needs. Safe to read back: it
            # holds tensors and plain containers only, and visionft loads every checkpoint weights-only
            # (visionft.checkpoints.AtomicCheckpointIO)
            self._saving = True
            try:
                trainer.save_checkpoint(path, weights_only=False)
            finally:
                self._saving = False
            self.saved = path
        self._restore()

    def interrupted(self, run: Path, trainer) -> Interrupted:
        """What to raise once fit stopped on a signal: the line naming where it stopped, the checkpoint that
        ``resume=true`` takes (``run/checkpoints/last.ckpt``) and the command that resumes."""
        from visionft.resume import resume_command

        self._restore()
        where, command = f"epoch {trainer.current_epoch}, step {trainer.global_step}", resume_command(run)
        if not self.at_once:
            return Interrupted(f"{self.signal_name} received: stopped at {where}; resumable checkpoint {self.saved}. "
                               f"Resume with: {command}", self.signal_name)
        last = Path(run) / "checkpoints" / "last.ckpt"
        kept = saved_position(last) if last.is_file() else None
        if kept is None:
            return Interrupted(f"SIGINT received twice: stopped at once at {where}; no resumable checkpoint was "
                               f"saved ({last}): start the run again", "SIGINT")
        return Interrupted(f"SIGINT received twice: stopped at once at {where}, not saved; resumable checkpoint "
                           f"{last} (epoch {kept[0]}, step {kept[1]}). Resume with: {command}", "SIGINT")


class ResumeState(L.Callback):
    """What an exact resume needs beyond Lightning's own checkpoint: the global RNG states (torch, CUDA, numpy,
    Python) and the training loader's position (a ``datamodules.loaders.ResumableLoader``). Both are restored just
    before the first training batch after a resume, so dropout, drop-path, mixup and the data order continue as the
    uninterrupted run's. (Lightning's own loader-state hook does not fire when the loader was set up before the
    restore, as estimating the schedule's length does.)"""

    def __init__(self) -> None:
        self._pending = None

    def state_dict(self) -> dict:
        import random

        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        return {"torch": torch.get_rng_state(), "python": random.getstate(),
                "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "loader": self._loader_state()}

    def _loader_state(self) -> dict | None:
        loader = getattr(getattr(self, "_trainer", None), "train_dataloader", None)
        return loader.state_dict() if hasattr(loader, "state_dict") else None

    def setup(self, trainer, pl_module, stage) -> None:
        self._trainer = trainer

    def load_state_dict(self, state: dict) -> None:
        self._pending = state

    def on_train_start(self, trainer, pl_module) -> None:  # after the restore, before the loader's first batch
        loader_state = (self._pending or {}).get("loader")
        loader = trainer.train_dataloader
        if loader_state and loader_state["epoch"] == trainer.current_epoch and hasattr(loader, "load_state_dict"):
            loader.load_state_dict(loader_state)  # a mid-epoch checkpoint: continue after the batches it took

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._pending is None:
            return
        import random

        import numpy as np

        state, self._pending = self._pending, None
        torch.set_rng_state(state["torch"])
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        random.setstate(_as_tuple(state["python"]))
        if state.get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list) else x
