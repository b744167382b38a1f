"""The report's figures (matplotlib + seaborn, Agg backend): confusion matrix, learning curves, most confidently wrong
images, and a sweep's metric against its swept keys and against trainable parameters."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from visionft.atomic import replacing


def _figure(**kwargs):
    """A figure outside pyplot (no global backend switch in a user's notebook, nothing to close)."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    with replacing(path, "figure") as tmp:
        fig.savefig(tmp, dpi=110, format=Path(path).suffix.lstrip(".") or "png")
    return path


def _text_safe(fn):
    """Draw with mathtext off: labels and titles made of class names ('price_$5') are drawn as written."""
    import functools

    @functools.wraps(fn)
    def drawn(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context({"text.parse_math": False}):
            return fn(*args, **kwargs)

    return drawn


@_text_safe
def confusion(matrix: np.ndarray, classes: list[str], path: Path) -> Path:
    """Row-normalized confusion matrix (each true class sums to 1); annotated up to 20 classes, and sized so that
    100 class names stay readable (the figure grows with the class count, the font shrinks down to 5 pt)."""
    import seaborn as sns

    n = len(classes)
    norm = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    side = float(np.clip(0.22 * n + 3, 5, 26))
    font = float(np.clip(11 - n / 10, 5, 10))
    fig = _figure(figsize=(side + 1.5, side))
    ax = fig.subplots()
    sns.heatmap(norm, ax=ax, vmin=0, vmax=1, cmap="Blues", square=True, annot=n <= 20, fmt=".2f",
                annot_kws={"size": font}, xticklabels=classes, yticklabels=classes, cbar_kws={"shrink": 0.6})
    ax.tick_params(labelsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (rows normalized: recall on the diagonal)")
    return _save(fig, path)


@_text_safe
def curves(history: pd.DataFrame, lrs: pd.DataFrame, opens: dict[str, int], path: Path) -> Path:
    """Train/val loss and accuracy per epoch, and the LR of every param group against (fractional) epochs; dashed
    lines where a depth group opens after the start."""
    fig = _figure(figsize=(15, 4))
    axes = fig.subplots(1, 3)
    x = history["epoch"] + 1
    for ax, what in zip(axes[:2], ("loss", "acc")):
        for split, style in (("train", "o-"), ("val", "s-")):
            col = f"{split}/{what}"
            if col in history and history[col].notna().any():
                ax.plot(x[history[col].notna()], history[col].dropna(), style, label=split, markersize=3)
        ax.set(xlabel="epoch", ylabel=what, title=f"{what} per epoch")
    axes[2].set(xlabel="epoch", ylabel="learning rate", title="LR per param group")
    for col in lrs.columns.drop("x", errors="ignore"):
        axes[2].plot(lrs["x"], lrs[col], label=col, linewidth=1)
    for ax in axes:
        for group, epoch in opens.items():
            ax.axvline(epoch, color="gray", linestyle="--", linewidth=0.7)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, ncol=2 if len(lrs.columns) > 8 else 1)
    for group, epoch in opens.items():
        axes[2].annotate(f"{group} opens", (epoch, 0), xytext=(2, 4), textcoords="offset points", rotation=90,
                         fontsize=6, color="gray", va="bottom")
    return _save(fig, path)


@_text_safe
def wrong_grid(images: np.ndarray, titles: list[str], path: Path) -> Path:
    n = len(images)
    cols = min(5, max(n, 1))
    rows = max(1, -(-n // cols))
    fig = _figure(figsize=(2.4 * cols, 2.7 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, titles):
        ax.imshow(image)
        ax.set_title(title, fontsize=7)
    fig.suptitle("most confidently wrong test images (true / predicted, probability)", fontsize=9)
    return _save(fig, path)


@_text_safe
def sweep_metric(groups: pd.DataFrame, keys: list[str], metric: str, path: Path) -> Path:
    """Mean +- std over seeds of ``metric`` against the first swept key (one line per combination of the others)."""
    fig = _figure(figsize=(max(6, 0.6 * groups[keys[0]].nunique() + 3), 4))
    ax = fig.subplots()
    x_key, hue = keys[0], keys[1:]
    labels = groups[hue].astype(str).agg(", ".join, axis=1) if hue else pd.Series([""] * len(groups), groups.index)
    numeric = pd.to_numeric(groups[x_key], errors="coerce").notna().all()
    order = list(dict.fromkeys(groups[x_key].astype(str)))
    if numeric:  # a numeric key: in increasing order, the points joined; categories stay points
        order = sorted(order, key=float)
    for label in dict.fromkeys(labels):
        part = groups[labels == label]
        part = part.assign(_x=[order.index(v) for v in part[x_key].astype(str)]).sort_values("_x")
        xs = part["_x"]
        ax.errorbar(xs, part["mean"], yerr=part["std"].fillna(0), fmt="o-" if numeric else "o", capsize=3,
                    label=label or None)
    ax.set_xticks(range(len(order)), order, rotation=30 if len(order) > 4 else 0,
                  ha="right" if len(order) > 4 else "center")
    ax.set(xlabel=x_key, ylabel=f"{metric} (mean ± std over seeds)")
    if hue:
        ax.legend(title=", ".join(hue), fontsize=7)
    return _save(fig, path)


@_text_safe
def sweep_params(groups: pd.DataFrame, keys: list[str], metric: str, path: Path) -> Path:
    return _save(params_figure(groups, keys, metric), path)


@_text_safe
def params_figure(groups: pd.DataFrame, keys: list[str], metric: str):
    """``metric`` (mean ± std over seeds) against trainable parameters, each point named by its swept values. The
    x axis is logarithmic (symlog: 0 stays drawable) and ticked at the groups' own parameter counts (at most 8, none
    overlapping), labelled 1.2k, 3.4M: a log axis ticks only powers of ten by default, and points that all lie
    within one decade then had no x label at all."""
    fig = _figure(figsize=(7, 4.5))
    ax = fig.subplots()
    ax.errorbar(groups["trainable_params"], groups["mean"], yerr=groups["std"].fillna(0), fmt="o", capsize=3)
    for _, g in groups.iterrows():
        ax.annotate(", ".join(str(g[k]) for k in keys), (g["trainable_params"], g["mean"]), fontsize=7,
                    xytext=(4, 2), textcoords="offset points")
    ax.set_xscale("symlog", linthresh=1e3)
    ticks = _param_ticks(pd.to_numeric(groups["trainable_params"]).to_numpy(float))
    ax.set_xticks(ticks, [human(t) for t in ticks], rotation=30 if len(ticks) > 4 else 0,
                  ha="right" if len(ticks) > 4 else "center")
    ax.set_xticks([], minor=True)
    ax.set(xlabel="trainable parameters", ylabel=f"{metric} (mean ± std over seeds)",
           title=f"{metric} against trainable parameters")
    return fig


def _param_ticks(counts: np.ndarray, most: int = 8) -> list[float]:
    """The distinct counts, smallest first, each kept when it lies at least 1/(most-1) of the axis's log range past
    the last one kept (labels that would overlap are left out; their points keep their annotations)."""
    unique = np.unique(counts)
    positive = unique[unique > 0]
    kept = [0.0] if len(positive) < len(unique) else []
    gap = np.log10(positive[-1] / positive[0]) / (most - 1) if len(positive) else 0.0
    for v in positive:
        if not kept or kept[-1] <= 0 or np.log10(v / kept[-1]) >= gap:
            kept.append(float(v))
    return kept


def human(n: float) -> str:
    """A parameter count in three significant figures: 960, 12.3k, 374k, 2.1M."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k"), (1, "")):
        if abs(n) >= 0.9995 * div or div == 1:  # 999,600 is 1M, not 1e+03k
            return f"{n / div:.3g}{unit}"
