"""What a run ships, each number with what it was computed on.

- ``chosen_model``: the checkpoint the final model comes from, the epoch and optimizer step it was saved at (as stored
  in it), and the parameters trainable up to that step, beside what trained over the whole run (``param_counts``).
  Under gradual unfreezing the best checkpoint can predate groups that opened later: its own count says so.
- ``ValPredictions`` and ``collapse``: the val split's label -> prediction counts of every validation (each epoch
  of the fit, then the final model), and the one-class collapse rule: the most predicted class takes at least
  ``COLLAPSE_SHARE`` (90%) of the val images of the other classes, i.e. the other classes' images are (almost) never
  predicted as anything but that class. All predictions in one class is the extreme case; a model that predicts
  the majority class of an imbalanced val set everywhere is caught too, though its accuracy looks fair. A val split
  holding one class cannot show it and is never flagged.
"""
from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch

log = logging.getLogger("visionft.train")

COLLAPSE_SHARE = 0.9


def trainable_upto(module, epoch: int) -> tuple[int, list[str]]:
    """Parameters that trained in epochs 0..``epoch`` (open sets only grow), counted as ``param_counts`` counts
    the run's, and the depth groups they lie in."""
    gates, dup = module.gates, module.adapted.duplicate
    names = [(n, p) for n, p in module.model.named_parameters() if n in gates.trainable and not dup(n)
             and any(gates.is_open(gates.depths[n], e) for e in range(epoch + 1))]
    depths = sorted({gates.depths[n] for n, _ in names})
    return sum(p.numel() for _, p in names), [module.group_names[d] for d in depths]


def chosen_model(module, path: str, out: Path, by: str, total: int) -> dict:
    """The checkpoint the final model is loaded from, with its epoch and step and what was trainable then."""
    if not path or not Path(path).is_file():
        return {}
    stored = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    epoch, step = int(stored.get("epoch", 0)), int(stored.get("global_step", 0))
    clock = getattr(module, "clock", None)  # the epoch of its last optimizer step, on the schedule's clock
    last = clock.epoch(step - 1) if clock is not None and step > 0 else epoch
    n, groups = trainable_upto(module, last)
    where = Path(path).resolve()
    try:
        name = where.relative_to(Path(out).resolve()).as_posix()
    except ValueError:
        name = str(where)
    log.info("final model: %s (%s), saved at epoch %d, step %d; trainable up to then: %s of %s parameters (%s)",
             name, by, epoch, step, f"{n:,}", f"{total:,}", ", ".join(groups) or "none")
    return {"checkpoint": name, "selected_by": by, "epoch": epoch, "step": step, "trainable_params": n,
            "trainable_pct": round(100 * n / max(total, 1), 4), "trainable_groups": groups}


def selected_by(final: str, ckpt, gradient_fit: bool) -> str:
    """How the fitted checkpoint was chosen, in words."""
    if not gradient_fit:
        return "no gradient fit: the head as solved on cached features"
    if ckpt is not None and final and final == ckpt.best_model_path:
        score = ckpt.best_model_score
        return f"best {ckpt.monitor} ({ckpt.mode})" + (f" = {float(score):.4g}" if score is not None else "")
    if Path(final).name == "last.ckpt":
        return "last.ckpt: the weights at the end of the last epoch"
    return "the weights at the end of the fit (no checkpoint callback saved one)"


class ValPredictions(L.Callback):
    """Label x prediction counts of each validation run (a C x C confusion, on the device, summed over processes).
    During a fit, an epoch whose val predictions collapse (``collapse``) is a WARNING line in the log."""

    def __init__(self, classes: list[str] | None = None) -> None:
        self.classes = classes
        self.counts: torch.Tensor | None = None
        self.result: np.ndarray | None = None

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.counts, self.result = None, None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not isinstance(outputs, torch.Tensor) or outputs.ndim != 2:
            return
        c, y = outputs.shape[-1], batch[1]
        if y.ndim != 1:
            return
        seen = torch.bincount(y.long() * c + outputs.argmax(-1), minlength=c * c)
        self.counts = seen if self.counts is None else self.counts + seen

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.counts is None or trainer.sanity_checking:
            return
        counts = trainer.strategy.reduce(self.counts, reduce_op="sum") if trainer.world_size > 1 else self.counts
        c = int(round(counts.numel() ** 0.5))
        self.result = counts.view(c, c).cpu().numpy()
        self.counts = None
        if trainer.state.fn == "fit" and trainer.is_global_zero:
            found = collapse(self.result, self.classes)
            if found["collapsed"]:
                log.warning("epoch %d (step %d): %s", trainer.current_epoch, trainer.global_step,
                            collapse_message(found, "the model"))


def confusion_of(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Label x prediction counts from probabilities (the probe path, which runs no val loop)."""
    idx = labels.astype(np.int64) * num_classes + probs.argmax(1)
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def collapse(confusion: np.ndarray, classes: list[str] | None = None) -> dict:
    """The val predictions' class counts beside the labels', and whether they collapsed to one class: the most
    predicted class takes at least ``COLLAPSE_SHARE`` of the val images whose label is another class."""
    confusion = np.asarray(confusion, dtype=np.int64)
    names = list(classes) if classes and len(classes) == len(confusion) else [str(i) for i in range(len(confusion))]
    predicted, labels, n = confusion.sum(0), confusion.sum(1), int(confusion.sum())
    top = int(predicted.argmax())
    others = n - int(labels[top])
    into_top = (int(predicted[top]) - int(confusion[top, top])) / others if others else 0.0
    return {"images": n, "predicted": dict(zip(names, map(int, predicted))),
            "labels": dict(zip(names, map(int, labels))), "top_class": names[top],
            "top_class_predicted_share": round(int(predicted[top]) / max(n, 1), 4),
            "top_class_label_share": round(int(labels[top]) / max(n, 1), 4),
            "other_classes_into_top": round(into_top, 4),
            "collapsed": bool(others and into_top >= COLLAPSE_SHARE)}


def collapse_message(found: dict, model: str) -> str:
    others = found["images"] - found["labels"][found["top_class"]]
    return (f"val predictions collapsed to one class: {model} predicts '{found['top_class']}' for "
            f"{found['top_class_predicted_share']:.1%} of the {found['images']:,} val images, including "
            f"{found['other_classes_into_top']:.1%} of the {others:,} images of other classes ('{found['top_class']}' "
            f"is {found['top_class_label_share']:.1%} of val): the other classes are (almost) never predicted. "
            f"Check the learning rate and optimizer (too high an LR often does this), the data and the labels")


def check_val_predictions(metrics: dict, confusion: np.ndarray | None, classes: list[str] | None) -> None:
    """``metrics["val_predictions"]``: the final model's val prediction counts and the collapse flag; a collapse is
    a WARNING line in the log and an entry of ``metrics["warnings"]`` (the card shows them at its top)."""
    metrics.pop("val_predictions", None)
    warnings = [w for w in metrics.get("warnings", []) if not w.startswith("val predictions collapsed")]
    if confusion is not None:
        chosen = metrics.get("chosen") or {}
        model = (f"the final model ({chosen['checkpoint']}, epoch {chosen['epoch']}"
                 + (f", WiSE-FT alpha {metrics['wise']['alpha']:g}" if "wise" in metrics else "") + ")"
                 if chosen else "the final model")
        found = collapse(confusion, classes)
        metrics["val_predictions"] = {"computed_on": f"val split, {model}", **found}
        if found["collapsed"]:
            warnings.append(collapse_message(found, model))
            log.warning(warnings[-1])
    metrics["warnings"] = warnings
