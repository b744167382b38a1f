"""The shared datamodule: splits, seeded few-shot subsets, albumentations transforms, loaders."""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset

from datamodules.transforms import eval_transform, to_chw_uint8, train_transform
from visionft.errors import UsageError

log = logging.getLogger(__name__)


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


class _TransformDataset(Dataset):
    def __init__(self, split: Split, transform) -> None:
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        image = self.transform(image=self.split.load(i))["image"]
        return to_chw_uint8(image), int(self.split.labels[i])


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


def _check_ranges(batch_size, eval_batch_size, num_workers, val_fraction, test_fraction, per_class) -> None:
    problems = [
        (not isinstance(batch_size, int) or batch_size < 1, f"data.batch_size={batch_size} must be an integer >= 1"),
        (eval_batch_size is not None and (not isinstance(eval_batch_size, int) or eval_batch_size < 1),
         f"data.eval_batch_size={eval_batch_size} must be an integer >= 1 (or null: 2 x batch_size)"),
        (not isinstance(num_workers, int) or num_workers < 0, f"data.num_workers={num_workers} must be >= 0"),
        (not 0 < val_fraction < 1, f"data.val_fraction={val_fraction} must be in (0, 1)"),
        (not 0 < test_fraction < 1, f"data.test_fraction={test_fraction} must be in (0, 1)"),
        (per_class is not None and (not isinstance(per_class, int) or per_class < 1),
         f"data.per_class={per_class} must be an integer >= 1 (images per class), or null for all"),
    ]
    for bad, message in problems:
        if bad:
            raise UsageError(message)


class ClassificationDataModule(L.LightningDataModule):
    """Base datamodule. Subclasses implement ``load_splits()`` returning ``(train, val, test, classes)`` where
    val/test may be None: a missing test split is carved from train by ``test_fraction``, a missing val split by
    ``val_fraction`` (both stratified and seeded), then ``per_class`` subsets the training split.

    Geometry (input size, interpolation, eval crop) comes from the backbone via ``configure()``; augmentation is
    the dataset's own (``augment`` block, see ``datamodules.transforms.train_transform``).
    """

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        per_class: int | None = None,
        seed: int = 0,
        image_size: int | None = None,
        augment: Mapping | None = None,
        eval_crop_pct: float | None = 1.0,
        pin_memory: bool | None = None,
        resident: bool | str = "auto",
        resident_max_mb: int = 2048,
    ) -> None:
        super().__init__()
        _check_ranges(batch_size, eval_batch_size, num_workers, val_fraction, test_fraction, per_class)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or 2 * batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.per_class, self.seed = per_class, seed
        self.image_size, self.augment, self.eval_crop_pct = image_size, dict(augment or {}), eval_crop_pct
        self.interpolation = "bicubic"
        self.splits: dict[str, Split] | None = None
        self.classes: list[str] = []
        if str(resident).lower() not in ("auto", "true", "false"):
            raise UsageError(f"data.resident={resident!r} must be auto, true or false")
        self.resident, self.resident_max_mb = str(resident).lower(), resident_max_mb
        self._resident: tuple | None = None  # ((device, world size), split -> (images, labels, sizes) or None)

    # -- to implement --------------------------------------------------------------------------------------
    def load_splits(self) -> tuple[Split, Split | None, Split | None, list[str]]:
        raise NotImplementedError

    # -- geometry from the backbone ------------------------------------------------------------------------
    def configure(self, image_size: int, interpolation: str = "bicubic", crop_pct: float = 0.875) -> None:
        self.image_size, self.interpolation = int(image_size), interpolation
        if self.eval_crop_pct is None:
            self.eval_crop_pct = crop_pct

    def eval_geometry(self) -> dict:
        """The geometry evaluation really uses (after ``configure``): what inference must reproduce."""
        return {"image_size": self.image_size, "interpolation": self.interpolation,
                "crop_pct": float(self.eval_crop_pct or 1.0)}

    # -- splits --------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        train, val, test, self.classes = self.load_splits()
        if test is None:
            train, test = stratified_split(train, self.test_fraction, self.seed, "test", self.classes)
        if val is None:
            train, val = stratified_split(train, self.val_fraction, self.seed + 1, "validation", self.classes)
        if self.per_class:
            train = per_class_subset(train, int(self.per_class), self.seed)
        self.splits = {"train": train, "val": val, "test": test}

    @property
    def num_classes(self) -> int:
        self.setup()
        return len(self.classes)

    def class_counts(self) -> np.ndarray:
        self.setup()
        return np.bincount(self.splits["train"].labels, minlength=self.num_classes)

    def sizes(self) -> dict[str, int]:
        self.setup()
        return {k: len(v) for k, v in self.splits.items()}

    # -- loaders -------------------------------------------------------------------------------------------
    def dataset(self, split: str, train_aug: bool | None = None) -> Dataset:
        self.setup()
        if self.image_size is None:
            raise RuntimeError("image_size is not set: call configure() with the backbone's input size first")
        augment = split == "train" if train_aug is None else train_aug
        if augment:
            t = train_transform(self.image_size, self.interpolation, self.augment)
        else:
            t = eval_transform(self.image_size, self.interpolation, self.eval_crop_pct or 1.0)
        return _TransformDataset(self.splits[split], t)

    def resident_splits(self) -> dict | None:
        """The splits decoded and kept on the training device (``datamodules.resident``), or None when
        ``data.resident`` is false or (auto) they cannot be: the reason is logged; with ``true`` it is an error."""
        from datamodules import resident

        self.setup()
        trainer = getattr(self, "trainer", None)
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        world = trainer.world_size if trainer is not None else 1
        if self.resident == "false":
            return None
        if self._resident is not None and self._resident[0] == (device, world):
            return self._resident[1]
        self._resident = None  # another device or world: built (or refused) again below, the old copy freed
        reason = resident.why_not(self, world)
        if reason is None:
            try:
                self._resident = ((device, world), resident.build(self, device, getattr(self, "cache_dir", None)))
                return self._resident[1]
            except resident.TooLarge as e:
                reason = str(e)
        if self.resident == "true":
            raise UsageError(f"data.resident=true, but {reason}: use data.resident=auto (or false)")
        resident.log.info("per-sample data loading: device-resident data is off because %s", reason)
        self._resident = ((device, world), None)  # decided for this device and world: not asked again
        return None

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        """Training: a ``ResumableLoader`` (batches a pure function of seed, epoch and position; see
        ``datamodules.loaders``) on one process, Lightning's distributed sampler under DDP. Evaluation: in order,
        with the loader's own generator (iterating never touches the global RNG)."""
        from datamodules.loaders import ResumableLoader, SeededDataset, mix

        on_device = self.resident_splits()
        if on_device is not None:
            return self._resident_loader(split, shuffle, *on_device[split])
        pin = torch.cuda.is_available() if self.pin_memory is None else self.pin_memory
        common = {"num_workers": self.num_workers, "persistent_workers": self.num_workers > 0, "pin_memory": pin}
        drop_last = shuffle and len(self.splits[split]) > self.batch_size
        trainer = getattr(self, "trainer", None)
        if shuffle and (trainer is None or trainer.world_size == 1):
            return ResumableLoader(SeededDataset(self.dataset(split), self.seed), self.batch_size, shuffle, drop_last,
                                   self.seed, trainer_of=lambda: getattr(self, "trainer", None), **common)
        return DataLoader(self.dataset(split), batch_size=self.batch_size if split == "train" else self.eval_batch_size,
                          shuffle=shuffle, drop_last=drop_last,
                          generator=torch.Generator().manual_seed(mix(self.seed, 2)), **common)

    def _resident_loader(self, split: str, shuffle: bool, images: torch.Tensor, labels: torch.Tensor, sizes=None):
        from datamodules.augment import parse
        from datamodules.resident import ResidentEvalLoader, ResidentTrainLoader

        if not shuffle:
            return ResidentEvalLoader(images, labels, self.eval_batch_size)
        return ResidentTrainLoader(images, labels, parse(self.augment)[0], self.image_size, self.interpolation,
                                   self.batch_size, len(labels) > self.batch_size, self.seed,
                                   trainer_of=lambda: getattr(self, "trainer", None), sizes=sizes)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
