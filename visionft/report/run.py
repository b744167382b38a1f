"""One run's report, built from the files the run left (so ``visionft report RUN_DIR`` rebuilds it): per-class
precision/recall/F1/support, the confusion matrix, learning curves, the most confidently wrong test images, and the
model card (``README.md``)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from visionft.atomic import write_text
from visionft.errors import UsageError
from visionft.report import plots, predictions
from visionft.report.card import entered_opens, model_card

log = logging.getLogger(__name__)
FIT_COLUMNS = ["train/loss", "train/acc", "val/loss", "val/acc"]


def per_class(pred: dict) -> pd.DataFrame:
    from sklearn.metrics import precision_recall_fscore_support

    labels, guess, classes = pred["labels"], pred["probs"].argmax(1), [str(c) for c in pred["classes"]]
    p, r, f, s = precision_recall_fscore_support(labels, guess, labels=range(len(classes)), zero_division=0)
    return pd.DataFrame({"class": classes, "precision": p, "recall": r, "f1": f, "support": s})


def confusion_matrix(pred: dict) -> np.ndarray:
    from sklearn.metrics import confusion_matrix as cm

    return cm(pred["labels"], pred["probs"].argmax(1), labels=range(len(pred["classes"])))


def history(run: Path, metrics: dict) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """Per-epoch fit metrics and the logged LR of every param group from ``csv/metrics.csv`` (fit epochs only:
    evaluation after fit logs at the last epoch; a resumed run's repeated rows keep their latest value)."""
    path = run / "csv" / "metrics.csv"
    if not path.is_file():
        return None
    df = pd.read_csv(path)
    fit = df[df["epoch"] < metrics.get("epochs", 0)] if "epoch" in df else df.iloc[0:0]
    cols = [c for c in FIT_COLUMNS if c in fit]
    if fit.empty or not cols:
        return None
    epochs = fit.groupby("epoch")[cols].last().reset_index()
    lr_cols = [c for c in df if c.startswith("lr-")]  # LR rows carry a step, no epoch
    names = {c: c.split("/", 1)[1] if "/" in c else c for c in lr_cols}
    keep = [c for c in lr_cols if not (names[c].endswith("/no_decay") and
                                        names[c].removesuffix("/no_decay") in names.values())]
    lrs = df.dropna(subset=keep, how="all")[["step", *keep]].drop_duplicates("step", keep="last")
    lrs = lrs.rename(columns=names)
    lrs.insert(0, "x", lrs.pop("step") / max(metrics.get("steps_per_epoch") or 1, 1))
    lrs = lrs[lrs["x"] <= metrics.get("epochs", 0)]
    return epochs, lrs


def wrong_titles(pred: dict) -> list[str]:
    classes = [str(c) for c in pred["classes"]]
    probs = pred["probs"][pred["wrong_index"]]
    return [f"{classes[t]} / {classes[p.argmax()]} ({p.max():.2f})"
            for t, p in zip(pred["labels"][pred["wrong_index"]], probs)]


def write(run: Path) -> list[Path]:
    """Build the report of the run in ``run`` from its files; returns what was written. Parts whose inputs are
    missing (no test split, no CSV logger, no gradient epochs) are skipped and the card says why."""
    run = Path(run)
    metrics = read_metrics(run / "metrics.json")
    out = run / "report"
    out.mkdir(exist_ok=True)
    written, notes = [], {}
    pred = predictions.load(run)
    table = None
    if pred is not None and len(pred["labels"]):
        table = per_class(pred)
        write_text(out / "per_class.csv", table.to_csv(index=False, float_format="%.4f"))
        written.append(out / "per_class.csv")
        classes = [str(c) for c in pred["classes"]]
        written.append(plots.confusion(confusion_matrix(pred), classes, out / "confusion.png"))
        if len(pred["wrong_index"]):
            written.append(plots.wrong_grid(pred["wrong_images"], wrong_titles(pred), out / "wrong.png"))
        else:
            notes["wrong"] = "no test image was misclassified"
    else:
        notes["test"] = "no test predictions (no test split, or the run stopped before evaluating)"
    curves = history(run, metrics)
    if curves is not None:
        opens = entered_opens(metrics)
        written.append(plots.curves(*curves, opens, out / "curves.png"))
    else:
        notes["curves"] = ("no gradient epochs (the head was solved in closed form)" if not metrics.get("epochs")
                           else "no csv/metrics.csv (the CSV logger was off)")
    card = run / "README.md"
    write_text(card, model_card(run, metrics, table, [p.relative_to(run) for p in written], notes))
    return [*written, card]


class UnreadableMetrics(UsageError):
    """A ``metrics.json`` that is not a JSON object (truncated by a kill, or not JSON at all)."""

    def __init__(self, path: Path, reason: str) -> None:
        self.reason = reason
        super().__init__(f"{path} is not readable ({reason}): the run stopped while writing it; run it again")


def read_metrics(path: Path) -> dict:
    """A run's ``metrics.json``, or ``UnreadableMetrics`` saying why it cannot be read."""
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # ValueError: not JSON (truncated), not UTF-8
        raise UnreadableMetrics(path, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}") from None
    if not isinstance(metrics, dict):
        raise UnreadableMetrics(path, f"a JSON {type(metrics).__name__}, not an object")
    return metrics
