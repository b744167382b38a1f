"""Device-resident data for datasets that fit a memory budget (``data.resident``): every image decoded once into a
uint8 tensor kept on the training device, whole batches augmented there (``datamodules.augment``), no worker
processes and no per-sample Python.

- Train: every image as it is, or, when its shorter side exceeds what the augmentation needs (the training size;
  for random-resized crops, the side at which the smallest crop is not upsampled: ``min_source``), resized to that
  (aspect ratio kept, nothing cropped; less, logged, when ``data.resident_max_mb`` cannot hold it); images of
  different shapes share one zero-padded canvas and keep their own sizes, so each crop, resize and shift is drawn
  on the whole image, as the per-sample path draws it. Batch k of epoch e is a pure function of (seed, e, k): the
  same ``EpochOrder`` shuffle as the per-sample loader, geometry drawn from a generator seeded by (seed, e, k); the
  loader's position is saved in checkpoints, so a resumed run sees exactly the batches an uninterrupted one sees.
- Val/test: the eval transform applied once per image (the per-sample path's own pipeline), then batches are
  slices.

Decoded image files are cached on disk under ``<cache_dir>/images`` (``visionft.featurecache.FeatureCache``: key,
checksum, atomic writes; size cap and eviction: ``visionft.cachedir``), keyed by the split's files, the geometry and
the library versions that decode and resize.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from datamodules.augment import warp
from datamodules.loaders import EpochOrder, Position, mix

log = logging.getLogger(__name__)


def stack(images, transform=None) -> torch.Tensor:
    """(N, 3, H, W) uint8 from an in-memory (N, H, W, 3) array, or from anything indexable by ``transform``'d
    HWC arrays (a list of decoded images)."""
    if transform is None and isinstance(images, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    out = [transform(image=img)["image"] if transform is not None else img for img in images]
    if not out:
        return torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
    return torch.from_numpy(np.ascontiguousarray(np.stack(out).transpose(0, 3, 1, 2)))


class ResidentTrainLoader(Position):
    """Training batches augmented on the device: iterable, sized, with the checkpointed position of
    ``datamodules.loaders.ResumableLoader`` (``state_dict``: epoch and batches taken)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, preset, size: int, interpolation: str,
                 batch_size: int, drop_last: bool, seed: int, trainer_of: Callable = lambda: None,
                 sizes: torch.Tensor | None = None) -> None:
        self.images, self.labels, self.preset, self.size = images, labels, preset, int(size)
        self.sizes = sizes  # (N, 2) each image's own (h, w) on a padded canvas; None: all fill it
        self.mode = "bicubic" if interpolation in ("bicubic", "lanczos") else (
            "nearest" if interpolation == "nearest" else "bilinear")
        self.batch_size, self.drop_last, self.seed, self.trainer_of = batch_size, drop_last, int(seed), trainer_of
        self.order = EpochOrder(len(labels), seed, shuffle=True)
        self.taken, self._resume = 0, None

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def batch(self, epoch: int, k: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``k`` of ``epoch``: images ``index`` with geometry drawn from a generator seeded by
        (seed, epoch, k)."""
        g = torch.Generator().manual_seed(mix(self.seed, epoch, k, 7))
        idx = index.to(self.images.device)
        if self.preset.fixed and self.sizes is None and tuple(self.images.shape[-2:]) == (self.size, self.size):
            return self.images[idx], self.labels[idx]  # no augmentation at the stored size: the warp is the identity
        hw = self.sizes[index] if self.sizes is not None else tuple(self.images.shape[-2:])
        geometry = self.preset.sample(len(index), hw, self.size, g)
        return warp(self.images[idx], geometry, self.size, self.mode, self.preset.padding), self.labels[idx]

    def __iter__(self):
        skipped = self.start_epoch()
        order = torch.tensor(self.order.order())
        for k in range(skipped, len(self)):
            batch = self.batch(self.order.epoch, k, order[k * self.batch_size:(k + 1) * self.batch_size])
            self.taken = k + 1  # counted when handed out: a checkpoint taken while the loop holds it resumes after it
            yield batch


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


class TooLarge(Exception):
    pass


def footprint_mb(dm) -> float:
    """MiB the resident splits are expected to take: in-memory images as they are, files at the training size."""
    if dm.image_size is None:
        raise RuntimeError("image_size is not set: call configure() with the backbone's input size first")
    total = 0
    for name, split in dm.splits.items():
        if name == "train" and isinstance(split.images, np.ndarray):
            total += split.images.nbytes
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


def _shrink(image: np.ndarray, size: int, interpolation: str) -> np.ndarray:
    """Shorter side down to ``size`` (aspect kept), or the image as it is when it is not larger."""
    import albumentations as A

    from datamodules.transforms import _interp

    if min(image.shape[:2]) <= size:
        return image
    return A.SmallestMaxSize(max_size=size, interpolation=_interp(interpolation))(image=image)["image"]


def _stored_hw(path: str) -> tuple[int, int]:
    """(h, w) of an image file as ``read_rgb`` returns it (EXIF orientation applied), from its header alone."""
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
        turned = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # orientations that swap width and height
    return (w, h) if turned else (h, w)


def stored_side(paths, size: int, need: int, budget_mb: float) -> int:
    """The shorter side the training images are stored at: ``need`` (the augmentation's smallest crop is then not
    upsampled) or, when the canvas would not fit ``budget_mb``, the largest side that fits, logged (never below
    ``size``: then ``train_canvas`` reports it too large)."""
    if need <= size or not len(paths):
        return size
    hw = np.array([_stored_hw(p) for p in paths], dtype=np.float64)

    def canvas_mb(side: int) -> float:
        s = np.minimum(1.0, side / hw.min(1))[:, None]
        return len(hw) * 3 * float(np.prod(np.round(hw * s).max(0))) / 2 ** 20

    if canvas_mb(need) <= budget_mb:
        return need
    lo, hi = size, need  # the largest side in [size, need) whose canvas fits
    while lo < hi - 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if canvas_mb(mid) <= budget_mb else (lo, mid)
    log.warning("resident training images kept at a shorter side of %d px, not %d: data.resident_max_mb=%s limits "
                "them (%.0f MiB needed), so the smallest random crops are upsampled up to %.2fx as a per-sample "
                "loader would not; raise data.resident_max_mb or set data.resident=false", lo, need, budget_mb,
                canvas_mb(need), need / lo)
    return lo


def train_canvas(images, side: int, interpolation: str, budget_mb: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, H, W) uint8 canvas (each image top-left, zero padding; shorter sides above ``side`` reduced to it)
    and the (N, 2) sizes, decoding one image at a time (``images``: an iterable of HWC arrays) so a folder of
    large photos never sits in memory whole."""
    kept = [_shrink(im, side, interpolation) for im in images]
    if not kept:
        return torch.zeros(0, 3, side, side, dtype=torch.uint8), torch.zeros(0, 2, dtype=torch.long)
    sizes = torch.tensor([im.shape[:2] for im in kept], dtype=torch.long)
    hmax, wmax = (int(v) for v in sizes.max(0).values)
    if len(kept) * 3 * hmax * wmax / 2 ** 20 > budget_mb:
        raise TooLarge(f"the decoded training images need {len(kept) * 3 * hmax * wmax / 2 ** 20:,.0f} MiB "
                       f"> data.resident_max_mb={budget_mb}")
    canvas = torch.zeros(len(kept), 3, hmax, wmax, dtype=torch.uint8)
    for i, im in enumerate(kept):
        canvas[i, :, :im.shape[0], :im.shape[1]] = torch.from_numpy(np.ascontiguousarray(im.transpose(2, 0, 1)))
    return canvas, sizes


def _key(dm, split, role: str) -> dict:
    from visionft.featurecache import versions
    from visionft.features import split_hash

    return {"resident": 2, "data": split_hash(split.images, split.labels), "size": dm.image_size,
            "interpolation": dm.interpolation, "role": role, **versions()}


def build(dm, device: torch.device, cache_root=None) -> dict[str, tuple]:
    """Every split decoded once (image files: through the disk cache) and moved to ``device``: split -> (images,
    labels, sizes or None)."""
    from datamodules.augment import parse
    from datamodules.transforms import eval_transform
    from visionft.featurecache import FeatureCache
    from visionft.features import Features

    cache = FeatureCache(cache_root, kind="images")
    crop = float(dm.eval_crop_pct or 1.0)
    need = parse(dm.augment)[0].min_source(dm.image_size)  # training images keep this much (see stored_side)
    evals = sum(3 * dm.image_size ** 2 * len(s) for n, s in dm.splits.items() if n != "train") / 2 ** 20
    budget = dm.resident_max_mb - evals  # what the training canvas may take
    out = {}
    for name, split in dm.splits.items():
        labels = torch.as_tensor(split.labels, dtype=torch.long)
        if isinstance(split.images, np.ndarray):  # in memory: train as it is, eval through its transform
            x = stack(split.images, None if name == "train" else eval_transform(dm.image_size, dm.interpolation, crop))
            out[name] = (x.to(device), labels.to(device), None)
            continue
        role = f"train side {need} budget {budget:.6f}" if name == "train" else f"eval crop {crop}"
        hit = cache.read(_key(dm, split, role))
        sizes_hit = cache.read({**_key(dm, split, role), "what": "sizes"}) if name == "train" else None
        files = (split.load(i) for i in range(len(split)))
        if hit is not None and (name != "train" or sizes_hit is not None):
            x, sizes = hit.x, sizes_hit.x if sizes_hit is not None else None
        elif name == "train":
            side = stored_side(split.images, dm.image_size, need, budget)
            x, sizes = train_canvas(files, side, dm.interpolation, dm.resident_max_mb)
            cache.write({**_key(dm, split, role), "what": "sizes"}, Features(sizes, labels))
        else:
            x, sizes = stack(files, eval_transform(dm.image_size, dm.interpolation, crop)), None
        if hit is None:
            cache.write(_key(dm, split, role), Features(x, labels))
        uniform = sizes is not None and bool((sizes == torch.tensor(x.shape[-2:])).all())
        out[name] = (x.to(device), labels.to(device), None if uniform else sizes)
    log.info("device-resident data on %s: %s", device, {k: tuple(v[0].shape) for k, v in out.items()})
    return out
