"""Albumentations pipelines. Geometry and augmentation run on uint8 HWC arrays; normalization is left to the model
(on device), so the output is a uint8 CHW tensor."""
from __future__ import annotations

import math
from collections.abc import Mapping

import albumentations as A
import cv2
import numpy as np
import torch

from datamodules.augment import parse

_INTERP = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}


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
    """Training pipeline from a dataset's ``augment`` block: ``name`` is one of the presets (``none``, ``shift``,
    ``crop_flip``; see ``datamodules.augment``), its options in its own block; ``color_jitter`` (strength, 0 = off)
    may be added to any preset."""
    preset, jitter = parse(augment)
    ops = preset.albumentations(size, _interp(interpolation))
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
