"""The shared datamodule: splits, seeded few-shot subsets, albumentations transforms, loaders."""
from __future__ import annotations

import logging
from collections.abc import Mapping

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.splits import TEST_FROM, Split, carve
from datamodules.transforms import eval_transform, to_chw_uint8, train_transform
from visionft.errors import UsageError

log = logging.getLogger(__name__)
SAMPLERS = (None, "balanced")  # data.sampler: the training epoch's draw (datamodules.loaders.EpochOrder)


class _TransformDataset(Dataset):
    def __init__(self, split: Split, transform) -> None:
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        image = self.transform(image=self.split.load(i))["image"]
        return to_chw_uint8(image), int(self.split.labels[i])


def _check_ranges(batch_size, eval_batch_size, num_workers, val_fraction, test_fraction, per_class,
                  test_from="train") -> None:
    problems = [
        (not isinstance(batch_size, int) or batch_size < 1, f"data.batch_size={batch_size} must be an integer >= 1"),
        (eval_batch_size is not None and (not isinstance(eval_batch_size, int) or eval_batch_size < 1),
         f"data.eval_batch_size={eval_batch_size} must be an integer >= 1 (or null: 2 x batch_size)"),
        (not isinstance(num_workers, int) or num_workers < 0, f"data.num_workers={num_workers} must be >= 0"),
        (not 0 < val_fraction < 1, f"data.val_fraction={val_fraction} must be in (0, 1)"),
        (not 0 <= test_fraction < 1, f"data.test_fraction={test_fraction} must be in [0, 1) (0: no test split)"),
        (test_from not in TEST_FROM, f"data.test_from={test_from!r} must be train or val (the split a missing test "
                                     f"split is carved from)"),
        (per_class is not None and (not isinstance(per_class, int) or per_class < 1),
         f"data.per_class={per_class} must be an integer >= 1 (images per class), or null for all"),
    ]
    for bad, message in problems:
        if bad:
            raise UsageError(message)


class ClassificationDataModule(L.LightningDataModule):
    """Base datamodule. Subclasses implement ``load_splits()`` returning ``(train, val, test, classes)`` where
    val/test may be None (and may name the splits they return in ``source_names``): a missing test split is carved
    from train (``test_from=val``: from the val split the data ships) by ``test_fraction`` (0: no test split), a
    missing val split from train by ``val_fraction`` (both stratified and seeded), then ``per_class`` subsets the
    training split; val and test are evaluated in a seeded, class-interleaved order. ``split_origin`` says where each
    split came from (``datamodules.splits``).

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
        test_from: str = "train",
        per_class: int | None = None,
        seed: int = 0,
        image_size: int | None = None,
        augment: Mapping | None = None,
        eval_crop_pct: float | None = 1.0,
        pin_memory: bool | None = None,
        resident: bool | str = "auto",
        resident_max_mb: int = 2048,
        sampler: str | None = None,
    ) -> None:
        super().__init__()
        if sampler not in SAMPLERS:
            raise UsageError(f"data.sampler={sampler!r} must be null (each image once per epoch, shuffled) or balanced "
                             f"(every class drawn equally often)")
        self.sampler = sampler
        _check_ranges(batch_size, eval_batch_size, num_workers, val_fraction, test_fraction, per_class, test_from)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or 2 * batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.val_fraction, self.test_fraction, self.test_from = val_fraction, test_fraction, test_from
        self.per_class, self.seed = per_class, seed
        self.image_size, self.augment, self.eval_crop_pct = image_size, dict(augment or {}), eval_crop_pct
        self.interpolation = "bicubic"
        self.splits: dict[str, Split] | None = None
        self.split_origin: dict[str, str] = {}  # split -> where its images came from (``datamodules.splits.carve``)
        self.source_names = {s: f"the dataset's {s} split" for s in ("train", "val", "test")}  # load_splits names
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
        self.splits, self.split_origin = carve(
            {"train": train, "val": val, "test": test}, self.source_names, self.classes,
            val_fraction=self.val_fraction, test_fraction=self.test_fraction, test_from=self.test_from,
            per_class=self.per_class, seed=self.seed)

    @property
    def num_classes(self) -> int:
        self.setup()
        return len(self.classes)

    def class_counts(self) -> np.ndarray:
        self.setup()
        return np.bincount(self.splits["train"].labels, minlength=self.num_classes)

    def sample_weights(self) -> torch.Tensor | None:
        """``data.sampler=balanced``: each training image's draw weight, 1 / its class's count (every class equally
        likely per draw); None: each image once per epoch."""
        if self.sampler != "balanced":
            return None
        labels = torch.as_tensor(self.splits["train"].labels)
        return 1.0 / torch.as_tensor(self.class_counts(), dtype=torch.double)[labels]

    def sizes(self) -> dict[str, int]:
        self.setup()
        return {k: len(v) for k, v in self.splits.items()}

    def fingerprint(self) -> dict:
        """What the splits hold (``datamodules.fingerprint``), saved in every checkpoint for a resume to compare."""
        from datamodules import fingerprint

        self.setup()
        return fingerprint.of(self.splits, self.classes, self.files_root())

    def changed_since(self, then: dict) -> list[str]:
        """One phrase per difference between a checkpoint's ``fingerprint()`` and the splits now (none: the same)."""
        from datamodules import fingerprint

        self.setup()
        return fingerprint.differences(then, self.splits, self.classes, self.files_root())

    def files_root(self) -> str | None:
        """The folder a fingerprint names image files relative to (so a moved data folder is the same data)."""
        return None

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

        trainer = getattr(self, "trainer", None)
        if shuffle and self.sampler and trainer is not None and trainer.world_size > 1:
            raise UsageError(f"data.sampler={self.sampler} runs on one process only: with {trainer.world_size} "
                             f"processes use loss.class_weights=balanced instead")
        on_device = self.resident_splits()
        if on_device is not None:
            loader = self._resident_loader(split, shuffle, *on_device[split])
            if shuffle:
                loader.order.weights = self.sample_weights()
            return loader
        pin = torch.cuda.is_available() if self.pin_memory is None else self.pin_memory
        common = {"num_workers": self.num_workers, "persistent_workers": self.num_workers > 0, "pin_memory": pin}
        drop_last = shuffle and len(self.splits[split]) > self.batch_size
        if shuffle and (trainer is None or trainer.world_size == 1):
            loader = ResumableLoader(SeededDataset(self.dataset(split), self.seed), self.batch_size, shuffle, drop_last,
                                     self.seed, trainer_of=lambda: getattr(self, "trainer", None), **common)
            loader.order.weights = self.sample_weights()
            return loader
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
