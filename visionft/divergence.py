"""The divergence guard: a run whose training or validation loss stops being finite, or grows ``factor`` x past the
loss at the start, is stopped before that epoch's checkpoints are written, and says which checkpoint it kept."""
from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch

from visionft.errors import UserError


class NonFiniteLoss(UserError, RuntimeError):
    pass


def saved_position(path: Path) -> tuple[int, int] | None:
    """The (epoch, global step) stored in a Lightning checkpoint, or None when it cannot be read. Memory-mapped:
    the tensors are not read."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(ckpt["epoch"]), int(ckpt["global_step"])
    except Exception:  # noqa: BLE001 - a file that is not a readable checkpoint is no kept checkpoint
        return None


def kept_checkpoint(trainer) -> tuple[Path, int, int] | None:
    """The newest checkpoint this run's checkpoint callbacks saved that is on disk: (path, epoch, step)."""
    paths = {Path(p) for c in trainer.checkpoint_callbacks
             for p in (getattr(c, "best_model_path", ""), getattr(c, "last_model_path", ""),
                       *getattr(c, "best_k_models", {})) if p}
    found = [(pos[1], pos[0], p) for p in paths if p.is_file() and (pos := saved_position(p)) is not None]
    if not found:
        return None
    step, epoch, path = max(found)
    return path, epoch, step


class NanGuard(L.Callback):
    """Stops a diverging run before its weights are saved: a non-finite training loss, an epoch whose mean training
    loss exceeds ``factor`` x the loss at the start, or a validation loss that is not finite or exceeds the same
    bound. Checked once per epoch before validation, after validation and at the epoch's end, each before that
    epoch's checkpoints (Lightning runs ``ModelCheckpoint`` callbacks last), so every checkpoint on disk is a good one.

    The loss at the start is the larger of ln K (K classes: the cross-entropy of a head that starts at zero, as a
    head created for the task does, label smoothing, mixup and class weights alike) and the first training batch's
    loss (computed before any optimizer step). A head fitted by a probe starts below ln K: the bound stays 100 x
    chance, not 100 x a loss near zero, which early fine-tuning may leave for a while. A randomly initialized head
    can start above ln K: its measured start is then the reference. Never an epoch's loss: an epoch that already
    diverged would make its own divergence the reference.

    Each batch's loss is kept as it is (no tensor work, no host sync per step) and folded into a device-side sum every
    ``FOLD`` steps; the validation loss is read from the logged ``val/loss`` once per validation."""

    FOLD = 256  # losses kept before they are folded into the epoch's running sum (bounded memory, no host sync)

    def __init__(self, factor: float = 100.0) -> None:
        self.factor, self.start, self._first = factor, None, None
        self._reset()

    def _reset(self) -> None:
        self._losses, self._steps = [], []  # the latest detached losses and their global steps: no work per step
        self._sum, self._n, self._first_bad = None, 0, None  # the folded ones: device tensors, read at checks only

    def _fold(self) -> None:
        losses = torch.stack(self._losses).float()
        bad = ~torch.isfinite(losses)
        steps = torch.tensor(self._steps, device=losses.device)
        first = torch.where(bad.any(), steps[bad.int().argmax()], -1)
        total = torch.nan_to_num(losses, nan=float("inf")).sum()
        if self._sum is None:
            self._sum, self._first_bad = total, first
        else:
            self._sum = self._sum + total
            self._first_bad = torch.where(self._first_bad >= 0, self._first_bad, first)
        self._n += len(self._losses)
        self._losses, self._steps = [], []

    def state_dict(self) -> dict:
        return {"start": self.start}

    def load_state_dict(self, state: dict) -> None:
        self.start = state.get("start")  # the loss before any step (a checkpoint without one: none)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._reset()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            loss = loss.detach()
            if self.start is None and self._first is None:
                self._first = loss
            self._losses.append(loss)
            self._steps.append(trainer.global_step)
            if len(self._losses) >= self.FOLD:
                self._fold()

    def reference(self, trainer, pl_module) -> float | None:
        """The loss at the start (see the class), or None before anything is known."""
        if self.start is None and self._first is not None:
            first = float(self._first) * trainer.accumulate_grad_batches  # Lightning divides the loss it hands on
            self.start, self._first = (first if math.isfinite(first) else None), None
        classes = getattr(pl_module, "meta", {}).get("num_classes")
        known = [v for v in (self.start, math.log(classes) if classes else None) if v is not None]
        return max(known) if known else None

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit":  # validation inside fit (mid-epoch too): checkpoints follow it
            self._check(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        val = trainer.callback_metrics.get("val/loss")
        if val is None:
            return
        val, ref = float(val), self.reference(trainer, pl_module)
        why = (f"validation loss {val}" if not math.isfinite(val) else
               f"validation loss {val:.4g} > {self.factor:g} x the loss at the start ({ref:.4g})"
               if ref is not None and val > self.factor * ref else None)
        self._agree(trainer, why)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._check(trainer, pl_module)

    def _check(self, trainer, pl_module) -> None:
        if self._losses:
            self._fold()
        if not self._n:
            return
        first_bad = int(self._first_bad)
        mean = float(self._sum) / self._n * trainer.accumulate_grad_batches
        ref = self.reference(trainer, pl_module)
        why = (f"loss not finite from step {first_bad}" if first_bad >= 0 else
               f"mean training loss {mean:.4g} > {self.factor:g} x the loss at the start ({ref:.4g})"
               if ref is not None and mean > self.factor * ref else None)
        self._agree(trainer, why)

    def _agree(self, trainer, why: str | None) -> None:
        """Stop when this process or any other diverged (each judges its own batches): every process stops
        together, none waits for the others at the next collective."""
        if trainer.strategy.reduce_boolean_decision(why is not None, all=False):
            self._stop(trainer, why or "another process's loss diverged")

    def _stop(self, trainer, why: str) -> None:
        lrs = sorted({g["lr"] for opt in trainer.optimizers for g in opt.param_groups})
        kept = kept_checkpoint(trainer)
        if kept is not None:
            path, epoch, step = kept
            said = f"The last checkpoint kept is {path} (epoch {epoch}, step {step}), saved before the divergence."
        elif trainer.current_epoch == 0:
            said = "No checkpoint was saved: the first epoch already diverged."
        else:
            said = "No checkpoint was saved (no checkpoint callback saved one)."
        precision = str(trainer.precision)
        hint = "" if precision in ("32-true", "32", "64-true", "64") else ", or use trainer.precision=32-true"
        raise NonFiniteLoss(
            f"training diverged in epoch {trainer.current_epoch} (step {trainer.global_step}): {why}; learning "
            f"rates {lrs[0]:.3g}..{lrs[-1]:.3g}, precision {precision}. {said} Lower strategy.lr or set "
            f"trainer.gradient_clip_val=1.0{hint}")
