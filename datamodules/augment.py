"""Training augmentation presets, each defined once with its two renderings side by side:

- ``albumentations(size, cv2_interp)``: the per-sample pipeline (uint8 HWC, CPU, any number of workers);
- ``sample(n, (h, w), size, generator)``: the same random geometry for a whole batch, as (n, 3, 3) matrices mapping
  output pixel coordinates to source pixel coordinates and (n, 4) boxes of the source each output may read; ``warp``
  applies them on the batch's device with one ``grid_sample`` (the device-resident path, ``datamodules.resident``).

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


def _hw(n: int, hw) -> tuple[torch.Tensor, torch.Tensor]:
    """Source heights and widths as float64 (n,) tensors, from one (h, w) or an (n, 2) tensor of per-image sizes."""
    hw = torch.as_tensor(hw, dtype=torch.float64)
    hw = hw.expand(n, 2) if hw.dim() == 1 else hw
    return hw[:, 0], hw[:, 1]


def _box(x0, y0, x1, y1) -> torch.Tensor:
    """(n, 4) source-pixel bounds [x_lo, y_lo, x_hi, y_hi] of what a sample may read (border padding clamps to it)."""
    return torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in (x0, y0, x1, y1)], 1)


@dataclass(frozen=True)
class NoAugment:
    """``none``: the eval geometry (shorter side resized to ``size``, centre crop), nothing random."""

    padding = "border"
    fixed = True  # the same geometry for every sample: at the stored size, nothing to resample

    def min_source(self, size: int) -> int:
        """The shorter side a stored image needs so that no sample is upsampled: the eval geometry's own."""
        return size

    def albumentations(self, size: int, interp: int) -> list:
        return [A.SmallestMaxSize(max_size=size, interpolation=interp), A.CenterCrop(height=size, width=size)]

    def sample(self, n: int, hw, size: int, g: torch.Generator | None) -> torch.Tensor:
        h, w = _hw(n, hw)
        s = size / torch.minimum(h, w)
        off_x, off_y = ((w * s).round() - size) // 2, ((h * s).round() - size) // 2
        m = torch.zeros(n, 3, 3, dtype=torch.float64)
        m[:, 0, 0], m[:, 0, 2] = 1 / s, (off_x + 0.5) / s - 0.5
        m[:, 1, 1], m[:, 1, 2], m[:, 2, 2] = 1 / s, (off_y + 0.5) / s - 0.5, 1
        return m.float(), _box(torch.zeros(n), torch.zeros(n), w - 1, h - 1)


@dataclass(frozen=True)
class Shift:
    """``shift``: resize to ``size``, then a small random affine: ``translate`` (fraction of the side), ``zoom``
    (x and y scales in 1 ± zoom), ``rotate`` (degrees), zero fill. For centred, orientation-sensitive images."""

    translate: float = 0.1
    zoom: float = 0.1
    rotate: float = 10.0
    padding = "zeros"
    fixed = False

    def min_source(self, size: int) -> int:
        """The per-sample path resizes to ``size`` first: a stored image needs no more."""
        return size

    def albumentations(self, size: int, interp: int) -> list:
        t, z, r = self.translate, self.zoom, self.rotate
        return [A.Resize(size, size, interpolation=interp),
                A.Affine(translate_percent=(-t, t), scale=(1 - z, 1 + z), rotate=(-r, r), interpolation=interp,
                         p=1.0)]

    def sample(self, n: int, hw, size: int, g: torch.Generator) -> torch.Tensor:
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
        h, w = _hw(n, hw)
        resize = torch.zeros(n, 3, 3, dtype=torch.float64)  # A.Resize(size, size): output pixel -> source pixel
        resize[:, 0, 0], resize[:, 0, 2] = w / size, 0.5 * w / size - 0.5
        resize[:, 1, 1], resize[:, 1, 2], resize[:, 2, 2] = h / size, 0.5 * h / size - 0.5, 1
        return (resize @ torch.linalg.inv(fwd)).float(), _box(torch.zeros(n), torch.zeros(n), w - 1, h - 1)


@dataclass(frozen=True)
class CropFlip:
    """``crop_flip``: random-resized crop (area fraction in ``scale``, aspect ratio in 3/4..4/3) and a horizontal
    flip half of the time. For natural images."""

    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    padding = "border"
    fixed = False

    def min_source(self, size: int) -> int:
        """The shorter side at which the smallest crop (area ``scale[0]``, the extreme ratios) still has ``size``
        pixels on each side, so it is never upsampled."""
        low, (r0, r1) = self.scale[0], self.ratio
        return math.ceil(size * max(math.sqrt(r1 / low), 1 / math.sqrt(low * r0)))

    def albumentations(self, size: int, interp: int) -> list:
        return [A.RandomResizedCrop(size=(size, size), scale=tuple(self.scale), interpolation=interp),
                A.HorizontalFlip(p=0.5)]

    def sample(self, n: int, hw, size: int, g: torch.Generator) -> torch.Tensor:
        h, w = _hw(n, hw)
        tries = torch.rand(n, 10, 4, generator=g, dtype=torch.float64)
        h, w = h[:, None], w[:, None]  # per image, broadcast over the tries
        area = h * w * (self.scale[0] + (self.scale[1] - self.scale[0]) * tries[..., 0])
        lr = math.log(self.ratio[0]) + (math.log(self.ratio[1]) - math.log(self.ratio[0])) * tries[..., 1]
        cw, ch = (area * lr.exp()).sqrt().round(), (area / lr.exp()).sqrt().round()
        ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
        first = ok.float().argmax(1)  # the first try that fits
        pick = lambda t: t.gather(1, first[:, None])[:, 0]  # noqa: E731
        cw, ch = pick(cw), pick(ch)
        h, w = h[:, 0], w[:, 0]
        x0, y0 = ((w - cw + 1) * pick(tries[..., 3])).floor(), ((h - ch + 1) * pick(tries[..., 2])).floor()
        fallback = ~ok.any(1)  # the whole image, ratio clamped into range, centred
        fw = torch.where(w / h > self.ratio[1], (h * self.ratio[1]).round(), w)
        fh = torch.where(w / h < self.ratio[0], (w / self.ratio[0]).round(), h)
        cw, ch = torch.where(fallback, fw, cw), torch.where(fallback, fh, ch)
        x0, y0 = torch.where(fallback, ((w - cw) // 2), x0), torch.where(fallback, ((h - ch) // 2), y0)
        flip = torch.rand(n, generator=g, dtype=torch.float64) < 0.5
        m = torch.zeros(n, 3, 3, dtype=torch.float64)
        sx, sy = cw / size, ch / size
        m[:, 0, 0] = torch.where(flip, -sx, sx)
        m[:, 0, 2] = x0 + torch.where(flip, (size - 0.5) * sx, 0.5 * sx) - 0.5
        m[:, 1, 1], m[:, 1, 2], m[:, 2, 2] = sy, y0 + 0.5 * sy - 0.5, 1
        return m.float(), _box(x0, y0, x0 + cw - 1, y0 + ch - 1)  # the crop is resized on its own (edges repeat)


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


def warp(images: torch.Tensor, geometry: tuple[torch.Tensor, torch.Tensor], size: int, mode: str = "bicubic",
         padding: str = "zeros") -> torch.Tensor:
    """Resample a uint8 NCHW batch through a preset's per-sample geometry (output pixel -> source pixel matrices,
    and source boxes) into ``size`` x ``size`` uint8 images, on the batch's device. Images of different shapes may
    share a zero-padded canvas (top-left aligned): each box keeps its sample inside its own image. ``padding``:
    ``zeros`` (outside the image is black, as albumentations' Affine fills) or ``border`` (source coordinates
    clamped into the box: edge pixels repeat, as cv2 resizes a crop)."""
    matrices, box = geometry
    n, _, ch, cw = images.shape
    dev = images.device
    box = box.float().to(dev)[:, :, None]
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32, device=dev),
                            torch.arange(size, dtype=torch.float32, device=dev), indexing="ij")
    out = torch.stack([xs.reshape(-1), ys.reshape(-1), torch.ones(size * size, device=dev)])  # (3, size * size)
    src = (matrices.float().to(dev) @ out)[:, :2]  # (n, 2, size * size) source pixel coordinates
    if padding == "border":
        src = torch.stack([src[:, 0].maximum(box[:, 0]).minimum(box[:, 2]),
                           src[:, 1].maximum(box[:, 1]).minimum(box[:, 3])], 1)
    grid = torch.stack([(2 * src[:, 0] + 1) / cw - 1, (2 * src[:, 1] + 1) / ch - 1], -1).view(n, size, size, 2)
    mode = mode if mode in ("bilinear", "nearest", "bicubic") else "bilinear"
    out = F.grid_sample(images.float(), grid, mode=mode, padding_mode="zeros", align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)
