"""Device-resident data for datasets that fit a memory budget (``data.resident``): every image decoded once into a
uint8 tensor kept on the training device, whole batches augmented there (``datamodules.augment``), no worker
processes and no per-sample Python.

- Train: the split as stored (images that share one shape no larger than the training size: as they are, e.g.
  CIFAR's 32 px; others: shorter side resized to the training size and centre-cropped), augmented per batch by the
  dataset's preset. Batch k of epoch e is a pure function of (seed, e, k): the same ``EpochOrder`` shuffle as the
  per-sample loader, geometry drawn from a generator seeded by (seed, e, k); the loader's position is saved in
  checkpoints, so a resumed run sees exactly the batches an uninterrupted one sees.
- Val/test: the eval transform applied once per image (the per-sample path's own pipeline), then batches are
  slices.

Decoded image files are cached on disk under ``<cache_dir>/images`` (the feature cache's format: key, checksum,
atomic writes), keyed by the split's files and the geometry.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from datamodules.augment import warp
from datamodules.loaders import EpochOrder, mix

log = logging.getLogger(__name__)


def stack(images, transform=None) -> torch.Tensor:
    """(N, 3, H, W) uint8 from an in-memory (N, H, W, 3) array, or from anything indexable by ``transform``'d
    HWC arrays (a list of decoded images)."""
    if transform is None and isinstance(images, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    out = [transform(image=img)["image"] if transform is not None else img for img in images]
    return torch.from_numpy(np.ascontiguousarray(np.stack(out).transpose(0, 3, 1, 2)))


class ResidentTrainLoader:
    """Training batches augmented on the device: iterable, sized, with the checkpointed position of
    ``datamodules.loaders.ResumableLoader`` (``state_dict``: epoch and batches taken)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, preset, size: int, interpolation: str,
                 batch_size: int, drop_last: bool, seed: int, trainer_of: Callable = lambda: None) -> None:
        self.images, self.labels, self.preset, self.size = images, labels, preset, int(size)
        self.mode = "bicubic" if interpolation in ("bicubic", "lanczos") else (
            "nearest" if interpolation == "nearest" else "bilinear")
        self.batch_size, self.drop_last, self.seed, self.trainer_of = batch_size, drop_last, int(seed), trainer_of
        self.order = EpochOrder(len(labels), seed, shuffle=True)
        self.taken, self._resume = 0, None

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def state_dict(self) -> dict:
        return {"epoch": self.order.epoch, "batches": self.taken}

    def load_state_dict(self, state: dict) -> None:
        self._resume = (int(state["epoch"]), int(state["batches"]))

    def batch(self, epoch: int, k: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``k`` of ``epoch``: images ``index`` with geometry drawn from a generator seeded by (seed, epoch, k)."""
        g = torch.Generator().manual_seed(mix(self.seed, epoch, k, 7))
        idx = index.to(self.images.device)
        m = self.preset.sample(len(index), tuple(self.images.shape[-2:]), self.size, g)
        return warp(self.images[idx], m, self.size, self.mode, self.preset.padding), self.labels[idx]

    def __iter__(self):
        trainer = self.trainer_of()
        epoch = trainer.current_epoch if trainer is not None else 0
        resume, self._resume = self._resume, None
        self.order.epoch, skipped = resume if resume is not None and resume[0] == epoch else (epoch, 0)
        order = torch.tensor(self.order.order())
        self.taken = skipped
        for k in range(skipped, len(self)):
            yield self.batch(self.order.epoch, k, order[k * self.batch_size:(k + 1) * self.batch_size])
            self.taken = k + 1


class ResidentEvalLoader:
    """Evaluation batches: slices of images already in their eval geometry, in order."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> None:
        self.images, self.labels, self.batch_size = images, labels, batch_size

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def __iter__(self):
        for k in range(len(self)):
            sl = slice(k * self.batch_size, (k + 1) * self.batch_size)
            yield self.images[sl], self.labels[sl]


def footprint_mb(dm) -> float:
    """Bytes the resident splits would take (train as stored, val/test at the eval size), in MiB."""
    total = 0
    for name, split in dm.splits.items():
        if name == "train" and isinstance(split.images, np.ndarray):
            total += split.images[:1].nbytes * len(split)
        else:
            total += 3 * dm.image_size ** 2 * len(split)
    return total / 2 ** 20


def why_not(dm, world_size: int) -> str | None:
    """None when the datamodule's splits can live on the device; otherwise the reason they cannot."""
    from datamodules.augment import parse

    if world_size > 1:
        return "it runs on one process only (each process would hold the whole dataset)"
    if parse(dm.augment)[1]:
        return "augment.color_jitter has no batched rendering"
    need = footprint_mb(dm)
    if need > dm.resident_max_mb:
        return f"the decoded splits need {need:,.0f} MiB > data.resident_max_mb={dm.resident_max_mb}"
    return None


def _train_images(split, size: int, interpolation: str) -> torch.Tensor:
    """The training split as stored on the device: as it is when its images share one shape no larger than the
    training size (CIFAR's 32 px: crops are drawn from the originals, as the per-sample path draws them); otherwise
    shorter side resized to ``size`` and centre-cropped (crops are then drawn from that square)."""
    from datamodules.transforms import eval_transform

    if isinstance(split.images, np.ndarray):
        return stack(split.images)
    images = [split.load(i) for i in range(len(split))]
    if len({im.shape for im in images}) == 1 and images[0].shape[0] * images[0].shape[1] <= size * size:
        return stack(images)
    return stack(images, eval_transform(size, interpolation, 1.0))


def build(dm, device: torch.device, cache_root=None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every split decoded once (image files: through the disk cache) and moved to ``device``."""
    from datamodules.transforms import eval_transform
    from visionft.features import FeatureCache, Features, split_hash

    cache = FeatureCache(cache_root, kind="images")
    out = {}
    for name, split in dm.splits.items():
        in_memory = isinstance(split.images, np.ndarray)
        crop = float(dm.eval_crop_pct or 1.0)
        key = {"data": split_hash(split.images, split.labels), "size": dm.image_size, "interpolation": dm.interpolation,
               "role": "train" if name == "train" else f"eval crop {crop}"}
        hit = None if in_memory else cache.read(key)
        if hit is not None:
            x = hit.x
        elif name == "train":
            x = _train_images(split, dm.image_size, dm.interpolation)
        else:
            x = stack(split.images if in_memory else (split.load(i) for i in range(len(split))),
                      eval_transform(dm.image_size, dm.interpolation, crop))
        if hit is None and not in_memory:
            cache.write(key, Features(x, torch.as_tensor(split.labels)))
        out[name] = (x.to(device), torch.as_tensor(split.labels, dtype=torch.long).to(device))
    log.info("device-resident data on %s: %s", device, {k: tuple(v[0].shape) for k, v in out.items()})
    return out
