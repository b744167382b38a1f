"""Making a run's three splits from what the data ships, and saying where each came from.

- ``Split``: one split's images (an array or file paths) and labels.
- ``stratified_split`` / ``per_class_subset``: seeded, stratified held-out fractions and few-shot subsets.
- ``carve``: a missing test split is carved from train (or, ``test_from="val"``, from the val split the data ships) by
  ``test_fraction`` (0: no test split), a missing val split from train by ``val_fraction``; ``origins`` says, per
  split, what it is (``"train/, less 49 images carved for test"``, ``"carved from train/: 20%, stratified, seed 0"``).
- ``spread_order``: the order val and test are evaluated in, fixed by the seed: classes interleaved so that every
  prefix (what ``trainer.limit_val_batches`` / ``limit_test_batches`` evaluate) holds each class in proportion,
  within one image.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import train_test_split

from visionft.errors import UsageError

log = logging.getLogger("datamodules.base")
TEST_FROM = ("train", "val")


@dataclass
class Split:
    """One split: images as an in-memory uint8 array (N, H, W, 3) or as file paths, and integer labels."""

    images: np.ndarray | Sequence[str]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> Split:
        index = np.asarray(index, dtype=np.int64)
        if isinstance(self.images, np.ndarray):
            return Split(self.images[index], self.labels[index])
        return Split([self.images[i] for i in index], self.labels[index])

    def load(self, i: int) -> np.ndarray:
        if isinstance(self.images, np.ndarray):
            return self.images[i]
        from datamodules.images import read_rgb

        return read_rgb(self.images[i])


def stratified_split(split: Split, fraction: float, seed: int, held: str = "held-out",
                     classes: Sequence[str] | None = None) -> tuple[Split, Split]:
    """Seeded, stratified (rest, held_out) split of ``fraction`` of the images. A class with a single image cannot
    be split: it stays whole in ``rest`` (warned); every class keeps at least one image in ``rest``."""
    counts = np.bincount(split.labels)
    lone = np.flatnonzero(counts == 1)
    if len(lone):
        names = ", ".join(repr(classes[c]) if classes else str(c) for c in lone)
        log.warning("class(es) %s have a single image: too few to split off a %s image, so it stays in training",
                    names, held)
    whole = np.isin(split.labels, lone)
    index = np.flatnonzero(~whole)
    if not len(index):
        return split, split.subset(index)
    labels = split.labels[index]
    n_classes, n_held = len(np.unique(labels)), int(np.ceil(fraction * len(index)))
    # stratify when every class fits on both sides; tiny splits fall back to a plain seeded split
    stratify = labels if n_classes <= n_held <= len(index) - n_classes else None
    rest, out = train_test_split(index, test_size=fraction, random_state=seed, stratify=stratify)
    for c in np.setdiff1d(labels, split.labels[rest]):  # no class may lose all its training images
        first = out[np.flatnonzero(split.labels[out] == c)[0]]
        rest, out = np.append(rest, first), out[out != first]
    return split.subset(np.sort(np.concatenate([rest, np.flatnonzero(whole)]))), split.subset(np.sort(out))


def per_class_subset(split: Split, per_class: int, seed: int) -> Split:
    """Seeded few-shot subset: ``per_class`` images of each class (all of a class that has fewer)."""
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(split.labels == c))[:per_class] for c in np.unique(split.labels)]
    return split.subset(np.sort(np.concatenate(keep)))


def spread_order(labels: np.ndarray, seed: int, stream: int = 0) -> np.ndarray:
    """A seeded order of the images in which every prefix holds each class in proportion to its share, within one
    image: each next image is of the class furthest behind its share (ties in a seeded random order of the classes),
    and each class's images come in a seeded random order."""
    rng = np.random.default_rng([int(seed), int(stream), 0x5EED])
    classes, counts = np.unique(labels, return_counts=True)
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    n, tie = len(labels), rng.permutation(len(classes))
    taken, order = np.zeros(len(classes), np.int64), np.empty(n, np.int64)
    for k in range(1, n + 1):  # behind = k * share - taken, times n (exact integers), then the tie-break
        behind = (k * counts - taken * n) * len(classes) + tie
        c = int(np.argmax(np.where(taken < counts, behind, np.iinfo(np.int64).min)))
        order[k - 1], taken[c] = pools[c][taken[c]], taken[c] + 1
    return order


def _held(fraction: float, seed: int) -> str:
    return f"{100 * fraction:g}%, stratified, seed {seed}"


def carve(given: Mapping[str, Split | None], names: Mapping[str, str], classes: Sequence[str], *, val_fraction: float,
          test_fraction: float, test_from: str, per_class: int | None, seed: int) -> tuple[dict, dict[str, str]]:
    """The train/val/test splits from those the data ships (``given``; val/test may be None) and, per split, where it
    came from (``names``: what the data calls each split it ships, e.g. ``train/``). Val and test are put in their
    evaluation order (``spread_order``)."""
    splits, origins = dict(given), {s: names[s] for s, split in given.items() if split is not None}
    less: dict[str, list[str]] = {"train": [], "val": []}
    if splits["test"] is None and test_fraction == 0:
        splits["test"] = splits["train"].subset(np.zeros(0, np.int64))
        origins["test"] = "none (data.test_fraction=0): no separate test set, val is the run's only evaluation"
    elif splits["test"] is None:
        source = test_from
        if source == "val" and splits["val"] is None:
            raise UsageError("data.test_from=val carves the test split from the val split the data ships, and this "
                             "data has none (no val/ folder): add one, or use data.test_from=train")
        splits[source], splits["test"] = stratified_split(splits[source], test_fraction, seed, "test", classes)
        origins["test"] = f"carved from {names[source]}: {_held(test_fraction, seed)}"
        less[source].append(f"{len(splits['test']):,} images carved for test")
    elif test_from != "train":
        log.info("data.test_from=%s does not apply: the data ships a test split (%s)", test_from, names["test"])
    if splits["val"] is None:
        splits["train"], splits["val"] = stratified_split(splits["train"], val_fraction, seed + 1, "validation",
                                                          classes)
        origins["val"] = f"carved from {names['train']}: {_held(val_fraction, seed + 1)}"
        less["train"].append(f"{len(splits['val']):,} images carved for val")
    for s, parts in less.items():
        if parts:
            origins[s] += ", less " + " and ".join(parts)
    if per_class:
        splits["train"] = per_class_subset(splits["train"], int(per_class), seed)
        origins["train"] += f"; then {per_class} images per class (data.per_class, seed {seed})"
    for stream, s in enumerate(("val", "test")):
        splits[s] = splits[s].subset(spread_order(splits[s].labels, seed, stream))
    return splits, {s: origins[s] for s in ("train", "val", "test")}
