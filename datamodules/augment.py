"""Training augmentation presets, each defined once with its two renderings side by side:

- ``albumentations(size, cv2_interp)``: the per-sample pipeline (uint8 HWC, CPU, any number of workers);
- ``sample(n, (h, w), size, generator)``: the same random geometry for a whole batch, as (n, 3, 3) matrices mapping
  output pixel coordinates to source pixel coordinates; ``warp`` applies them on the batch's device with one
  ``grid_sample`` (the device-resident path, ``datamodules.resident``).

The sampling follows albumentations' own (``RandomResizedCrop``: ten tries of area and log-ratio, start offsets,
central fallback; ``Affine``: translation truncated to pixels, x and y scales drawn independently, rotation about
the centre, zero fill), so both paths draw from one distribution; ``tests/test_resident.py`` checks it by
measuring the geometry each path produces on coordinate-encoding images.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import albumentations as A
import torch
import torch.nn.functional as F

from visionft.errors import UsageError


@dataclass(frozen=True)
class NoAugment:
    """``none``: the eval geometry (shorter side resized to ``size``, centre crop), nothing random."""

    padding = "border"

    def albumentations(self, size: int, interp: int) -> list:
        return [A.SmallestMaxSize(max_size=size, interpolation=interp), A.CenterCrop(height=size, width=size)]

    def sample(self, n: int, hw: tuple[int, int], size: int, g: torch.Generator) -> torch.Tensor:
        h, w = hw
        s = size / min(h, w)
        off_x, off_y = (round(w * s) - size) // 2, (round(h * s) - size) // 2
        m = torch.tensor([[1 / s, 0.0, (off_x + 0.5) / s - 0.5], [0.0, 1 / s, (off_y + 0.5) / s - 0.5],
                          [0.0, 0.0, 1.0]])
        return m.expand(n, 3, 3).clone()


@dataclass(frozen=True)
class Shift:
    """``shift``: resize to ``size``, then a small random affine: ``translate`` (fraction of the side), ``zoom``
    (x and y scales in 1 ± zoom), ``rotate`` (degrees), zero fill. For centred, orientation-sensitive images."""

    translate: float = 0.1
    zoom: float = 0.1
    rotate: float = 10.0
    padding = "zeros"

    def albumentations(self, size: int, interp: int) -> list:
        t, z, r = self.translate, self.zoom, self.rotate
        return [A.Resize(size, size, interpolation=interp),
                A.Affine(translate_percent=(-t, t), scale=(1 - z, 1 + z), rotate=(-r, r), interpolation=interp,
                         p=1.0)]

    def sample(self, n: int, hw: tuple[int, int], size: int, g: torch.Generator) -> torch.Tensor:
        u = torch.rand(n, 5, generator=g, dtype=torch.float64)
        t, z, r = self.translate, self.zoom, self.rotate
        tx, ty = ((2 * u[:, :2] - 1) * t * size).trunc().unbind(1)  # albumentations: int(fraction * side)
        sx, sy = (1 - z + 2 * z * u[:, 2:4]).unbind(1)
        a = torch.deg2rad((2 * u[:, 4] - 1) * r)
        c = size / 2 - 0.5
        # forward map (source -> output, about the centre c): out = R S (src - c) + c + t, R = [[cos, sin], [-sin, cos]]
        fwd = torch.zeros(n, 3, 3, dtype=torch.float64)
        fwd[:, 0, 0], fwd[:, 0, 1] = a.cos() * sx, a.sin() * sy
        fwd[:, 1, 0], fwd[:, 1, 1] = -a.sin() * sx, a.cos() * sy
        fwd[:, 0, 2] = c + tx - (fwd[:, 0, 0] + fwd[:, 0, 1]) * c
        fwd[:, 1, 2] = c + ty - (fwd[:, 1, 0] + fwd[:, 1, 1]) * c
        fwd[:, 2, 2] = 1
        h, w = hw
        resize = torch.tensor([[w / size, 0, 0.5 * w / size - 0.5], [0, h / size, 0.5 * h / size - 0.5], [0, 0, 1]],
                              dtype=torch.float64)
        return (resize @ torch.linalg.inv(fwd)).float()


@dataclass(frozen=True)
class CropFlip:
    """``crop_flip``: random-resized crop (area fraction in ``scale``, aspect ratio in 3/4..4/3) and a horizontal
    flip half of the time. For natural images."""

    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    padding = "border"

    def albumentations(self, size: int, interp: int) -> list:
        return [A.RandomResizedCrop(size=(size, size), scale=tuple(self.scale), interpolation=interp),
                A.HorizontalFlip(p=0.5)]

    def sample(self, n: int, hw: tuple[int, int], size: int, g: torch.Generator) -> torch.Tensor:
        h, w = hw
        tries = torch.rand(n, 10, 4, generator=g, dtype=torch.float64)
        area = h * w * (self.scale[0] + (self.scale[1] - self.scale[0]) * tries[..., 0])
        lr = math.log(self.ratio[0]) + (math.log(self.ratio[1]) - math.log(self.ratio[0])) * tries[..., 1]
        cw, ch = (area * lr.exp()).sqrt().round(), (area / lr.exp()).sqrt().round()
        ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
        first = ok.float().argmax(1)  # the first try that fits
        pick = lambda t: t.gather(1, first[:, None])[:, 0]  # noqa: E731
        cw, ch = pick(cw), pick(ch)
        x0, y0 = ((w - cw + 1) * pick(tries[..., 3])).floor(), ((h - ch + 1) * pick(tries[..., 2])).floor()
        fallback = ~ok.any(1)  # the whole image, ratio clamped into range, centred
        fw = torch.where(torch.tensor(w / h > self.ratio[1]), torch.tensor(float(round(h * self.ratio[1]))),
                         torch.tensor(float(w)))
        fh = torch.where(torch.tensor(w / h < self.ratio[0]), torch.tensor(float(round(w / self.ratio[0]))),
                         torch.tensor(float(h)))
        cw, ch = torch.where(fallback, fw, cw), torch.where(fallback, fh, ch)
        x0, y0 = torch.where(fallback, ((w - cw) // 2), x0), torch.where(fallback, ((h - ch) // 2), y0)
        flip = torch.rand(n, generator=g, dtype=torch.float64) < 0.5
        m = torch.zeros(n, 3, 3, dtype=torch.float64)
        sx, sy = cw / size, ch / size
        m[:, 0, 0] = torch.where(flip, -sx, sx)
        m[:, 0, 2] = x0 + torch.where(flip, (size - 0.5) * sx, 0.5 * sx) - 0.5
        m[:, 1, 1], m[:, 1, 2], m[:, 2, 2] = sy, y0 + 0.5 * sy - 0.5, 1
        return m.float()


PRESETS = {"none": NoAugment, "shift": Shift, "crop_flip": CropFlip}
COMMON_OPTIONS = ("color_jitter",)


def parse(augment: Mapping | None) -> tuple[NoAugment | Shift | CropFlip, float]:
    """A dataset's ``augment`` block -> (preset, color_jitter strength). Each preset reads its options from its own
    block (``augment[name]``); anything else is an error naming the valid options."""
    augment = dict(augment or {})
    name = augment.pop("name", "none")
    if name not in PRESETS:
        raise UsageError(f"unknown augment preset {name!r}; valid: {', '.join(PRESETS)}")
    options = {p: tuple(f for f in PRESETS[p].__dataclass_fields__) for p in PRESETS}
    unknown = set(augment) - set(PRESETS) - set(COMMON_OPTIONS)
    if unknown:
        raise UsageError(f"unknown augment option(s) {sorted(unknown)}: a preset's options go in its own block, e.g. "
                         f"data.augment.{name}.<option> ({name}: {', '.join(options[name]) or 'none'}); "
                         f"common: {', '.join(COMMON_OPTIONS)}")
    opts = dict(augment.get(name) or {})
    if set(opts) - set(options[name]):
        raise UsageError(f"unknown option(s) {sorted(set(opts) - set(options[name]))} for augment preset "
                         f"{name!r}; valid: {', '.join(options[name]) or 'none'}")
    opts = {k: v if isinstance(v, (int, float, str)) else tuple(v) for k, v in opts.items()}  # lists: ranges
    return PRESETS[name](**opts), float(augment.get("color_jitter", 0.0) or 0.0)


def warp(images: torch.Tensor, matrices: torch.Tensor, size: int, mode: str = "bicubic",
         padding: str = "zeros") -> torch.Tensor:
    """Resample a uint8 NCHW batch through per-sample (output pixel -> source pixel) matrices into ``size`` x
    ``size`` uint8 images, on the batch's device."""
    n, _, h, w = images.shape
    to_norm = torch.tensor([[2 / w, 0, 1 / w - 1], [0, 2 / h, 1 / h - 1], [0, 0, 1]])
    from_norm = torch.tensor([[size / 2, 0, (size - 1) / 2], [0, size / 2, (size - 1) / 2], [0, 0, 1]])
    theta = (to_norm @ matrices @ from_norm)[:, :2].to(images.device)
    grid = F.affine_grid(theta, [n, images.shape[1], size, size], align_corners=False)
    mode = mode if mode in ("bilinear", "nearest", "bicubic") else "bilinear"
    out = F.grid_sample(images.float(), grid, mode=mode, padding_mode=padding, align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)
