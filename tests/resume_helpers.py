"""Callbacks the exact-resume tests inject into CLI runs (PYTHONPATH=tests): record every training batch, and kill
the process (SIGKILL, no cleanup) at a given point; ``run_recorded`` starts such a run, ``records`` and
``last_weights`` read what it left."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch


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


def run_recorded(args: list[str], out: Path, record: Path, *extra: str) -> subprocess.CompletedProcess:
    """``python -m visionft`` with ``args`` into ``out``, every training batch recorded in ``record`` (the tests
    folder put before the caller's PYTHONPATH, so the run imports the same visionft as the test)."""
    tests = os.pathsep.join(p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": tests}
    argv = [*args, "+callbacks.recorder._target_=resume_helpers.Recorder", f"+callbacks.recorder.path={record}",
            f"paths.output_dir={out}", *extra]
    return subprocess.run([sys.executable, "-m", "visionft", *argv], capture_output=True, text=True, env=env,
                          cwd=out.parent, timeout=600)


def records(path: Path) -> list[tuple[str, ...]]:
    return [tuple(line.split()) for line in path.read_text().splitlines()]


def last_weights(out: Path) -> dict:
    return torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
