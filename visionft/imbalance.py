"""Class imbalance in the training split: the per-class counts (from the split's labels, no image decoded) and one
warning at the start of a run when the largest class has ``RATIO`` times the images of the smallest and neither
``loss.class_weights`` nor ``data.sampler=balanced`` is set: on such data an unweighted fit can end predicting
only the large classes (200 vs 5 images: macro-F1 0.33, the small class never predicted).

``RATIO = 10``: the imbalance-learning literature calls a data set highly imbalanced from an imbalance ratio
(largest / smallest class) above 9 (the KEEL benchmark's split of its imbalanced sets, Fernandez et al. 2009); two
classes at 10:1 leave the small one 9% of the images, inside what Google's ML course calls moderate imbalance
(1-20%)."""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)
RATIO = 10  # largest / smallest training class count from which a run warns


def class_counts(dm) -> dict[str, int]:
    """Training images per class, in class order."""
    return {str(c): int(n) for c, n in zip(dm.classes, dm.class_counts())}


def warning(dm, module) -> str | None:
    """The imbalance warning for this run, or None: balanced enough, or already handled (``loss.class_weights``
    set; ``data.sampler=balanced`` where a gradient fit draws the batches)."""
    counts = class_counts(dm)
    handled = module.options.class_weights is not None or (
        getattr(dm, "sampler", None) == "balanced" and module.strategy.gradient_fit)
    if len(counts) < 2 or handled:
        return None
    most, fewest = max(counts, key=counts.get), min(counts, key=counts.get)
    if counts[most] < RATIO * counts[fewest]:
        return None
    ratio = f"{counts[most] / counts[fewest]:.0f}x" if counts[fewest] else "no image at all"
    fix = "loss.class_weights=balanced" + (" or data.sampler=balanced" if module.strategy.gradient_fit else "")
    return (f"class imbalance in train: most {most!r} {counts[most]:,}, fewest {fewest!r} {counts[fewest]:,} "
            f"({ratio}); the model may never predict the small classes: set {fix}")


def warn(dm, module) -> None:
    """Log the imbalance warning (once, as the run starts)."""
    message = warning(dm, module)
    if message:
        log.warning(message)


def recorded(dm, module) -> dict:
    """For ``metrics.json``: the training class counts, and the warning (the card shows ``warnings`` at its top)."""
    message = warning(dm, module)
    return {"class_counts": {"train": class_counts(dm)}, **({"warnings": [message]} if message else {})}


def card_line(metrics: dict, limit: int = 20) -> list[str]:
    """The model card's line of training images per class: every class up to ``limit`` classes, else the range."""
    counts = (metrics.get("class_counts") or {}).get("train")
    if not counts:
        return []
    if len(counts) <= limit:
        return ["- training images per class: " + ", ".join(f"{c} {n:,}" for c, n in counts.items())]
    most, fewest = max(counts, key=counts.get), min(counts, key=counts.get)
    return [f"- training images per class: {counts[fewest]:,} ({fewest}) to {counts[most]:,} ({most}) over "
            f"{len(counts)} classes (all of them: metrics.json class_counts)"]
