"""Albumentations pipelines. Geometry and augmentation run on uint8 HWC arrays; normalization is left to the model
(on device), so the output is a uint8 CHW tensor."""
from __future__ import annotations

import math
from collections.abc import Mapping

import albumentations as A
import cv2
import numpy as np
import torch

from visionft.errors import UsageError

_INTERP = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}

# preset -> its options. Each preset's options live in their own block (augment.shift.zoom, augment.crop_flip.scale),
# so switching preset on the command line (data.augment.name=none on digits) just works and no option of one preset
# is silently taken for another's; a key that is neither a preset block nor a common option is an error.
PRESET_OPTIONS = {"none": (), "shift": ("translate", "zoom", "rotate"), "crop_flip": ("scale",)}
COMMON_OPTIONS = ("color_jitter",)
AUGMENT_PRESETS = tuple(PRESET_OPTIONS)


def _interp(name: str) -> int:
    return _INTERP.get(str(name), cv2.INTER_CUBIC)


def eval_transform(size: int, interpolation: str = "bicubic", crop_pct: float = 1.0) -> A.Compose:
    """timm-style eval: resize the shorter side to size / crop_pct, then center-crop ``size``."""
    resize = int(math.floor(size / crop_pct)) if crop_pct < 1.0 else size
    interp = _interp(interpolation)
    return A.Compose(
        [A.SmallestMaxSize(max_size=resize, interpolation=interp), A.CenterCrop(height=size, width=size)]
    )


def train_transform(size: int, interpolation: str = "bicubic", augment: Mapping | None = None) -> A.Compose:
    """Training pipeline from a dataset's ``augment`` block: ``name`` is one of AUGMENT_PRESETS.

    - ``none``: the eval geometry (resize + center crop), nothing random.
    - ``shift``: resize, then a small random affine (``translate``, ``zoom``, ``rotate`` degrees); for digits and
      other centred, orientation-sensitive images where flips and aggressive crops destroy the label.
    - ``crop_flip``: random-resized crop (``scale`` range) and horizontal flip; for natural images.
    Each preset reads its options from its own block (``augment[name]``); ``color_jitter`` (strength, 0 = off) may be
    added to any preset.
    """
    augment = dict(augment or {})
    name = augment.pop("name", "none")
    if name not in PRESET_OPTIONS:
        raise UsageError(f"unknown augment preset {name!r}; valid: {', '.join(AUGMENT_PRESETS)}")
    unknown = set(augment) - set(PRESET_OPTIONS) - set(COMMON_OPTIONS)
    if unknown:
        raise UsageError(f"unknown augment option(s) {sorted(unknown)}: a preset's options go in its own block, e.g. "
                         f"data.augment.{name}.<option> ({name}: {', '.join(PRESET_OPTIONS[name]) or 'none'}); "
                         f"common: {', '.join(COMMON_OPTIONS)}")
    opts = dict(augment.get(name) or {})
    if set(opts) - set(PRESET_OPTIONS[name]):
        raise UsageError(f"unknown option(s) {sorted(set(opts) - set(PRESET_OPTIONS[name]))} for augment preset "
                         f"{name!r}; valid: {', '.join(PRESET_OPTIONS[name]) or 'none'}")
    interp = _interp(interpolation)
    if name == "none":
        ops = list(eval_transform(size, interpolation, 1.0).transforms)
    elif name == "shift":
        t, z, r = opts.get("translate", 0.1), opts.get("zoom", 0.1), opts.get("rotate", 10)
        ops = [
            A.Resize(size, size, interpolation=interp),
            A.Affine(translate_percent=(-t, t), scale=(1 - z, 1 + z), rotate=(-r, r), interpolation=interp, p=1.0),
        ]
    else:  # crop_flip
        lo, hi = opts.get("scale", (0.35, 1.0))
        ops = [
            A.RandomResizedCrop(size=(size, size), scale=(lo, hi), interpolation=interp),
            A.HorizontalFlip(p=0.5),
        ]
    jitter = augment.get("color_jitter", 0.0)
    if jitter:
        ops.append(A.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter, hue=0.0, p=0.8))
    return A.Compose(ops)


def to_chw_uint8(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def normalize_uint8(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 NCHW batch -> float, normalized with mean/std given in [0, 1] units (timm's pretrained_cfg)."""
    mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255
    std = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255
    return (images.float() - mean) / std
