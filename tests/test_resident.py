"""The device-resident data path against the per-sample (albumentations) path it replaces.

Geometry is measured, not compared with itself: each source image encodes its own pixel coordinates (red = x,
green = y, blue = 255 inside the image), so every augmented output reveals the affine map that produced it (a
least-squares fit of source coordinates on output coordinates). The distributions of those maps must agree
between albumentations and the batched rendering (two-sample KS tests)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import compose_cfg
from scipy.stats import ks_2samp

from datamodules.augment import CropFlip, NoAugment, Shift, warp
from datamodules.resident import ResidentEvalLoader, ResidentTrainLoader
from datamodules.transforms import train_transform

N = 600


def coordinate_image(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 / (w - 1), yy * 255 / (h - 1), np.full((h, w), 255)], -1)
    return np.round(img).astype(np.uint8)


def fitted_maps(outputs: np.ndarray, h: int, w: int) -> np.ndarray:
    """(n, 6): per output image (HWC uint8), the least-squares affine map from output pixel to source pixel, fitted
    on interior pixels that came from inside the source (blue = 255)."""
    s = outputs.shape[1]
    yy, xx = np.mgrid[0:s, 0:s]
    design = np.stack([xx.ravel(), yy.ravel(), np.ones(s * s)], 1)
    maps = []
    for out in outputs.astype(np.float64):
        inside = (out[..., 2].ravel() > 250)
        src_x, src_y = out[..., 0].ravel() * (w - 1) / 255, out[..., 1].ravel() * (h - 1) / 255
        coef_x = np.linalg.lstsq(design[inside], src_x[inside], rcond=None)[0]
        coef_y = np.linalg.lstsq(design[inside], src_y[inside], rcond=None)[0]
        maps.append(np.concatenate([coef_x, coef_y]))
    return np.array(maps)


def both_paths(preset_block: dict, preset, h: int, w: int, size: int, canvas: tuple[int, int] | None = None):
    """Fitted maps of N augmentations of one coordinate image by albumentations and by the batched path; with
    ``canvas``, the batched path sees the image top-left on a larger zero canvas with its own size passed along
    (as a training split of mixed shapes is stored)."""
    img = coordinate_image(h, w)
    t = train_transform(size, "bilinear", preset_block)
    t.set_random_seed(0)
    per_sample = np.stack([t(image=img)["image"] for _ in range(N)])
    ch, cw = canvas or (h, w)
    padded = np.zeros((ch, cw, 3), np.uint8)
    padded[:h, :w] = img
    batch = torch.from_numpy(padded.transpose(2, 0, 1).copy())[None].expand(N, -1, -1, -1)
    g = torch.Generator().manual_seed(0)
    sizes = torch.tensor([[h, w]] * N)
    device = warp(batch, preset.sample(N, sizes, size, g), size, "bilinear", preset.padding)
    return fitted_maps(per_sample, h, w), fitted_maps(device.permute(0, 2, 3, 1).numpy(), h, w)


def same_distribution(a: np.ndarray, b: np.ndarray, resolution: float) -> bool:
    """A two-sample KS test (p > 1e-3), or, for near-constant coefficients (where KS flags differences of
    interpolation rounding), every 5%-quantile within ``resolution`` (0.01 for a scale, 0.25 px for an offset)."""
    if ks_2samp(a, b).pvalue > 1e-3:
        return True
    q = np.linspace(0.05, 0.95, 19)
    return bool(np.abs(np.quantile(a, q) - np.quantile(b, q)).max() <= resolution)


@pytest.mark.parametrize("block,preset,hw,size,canvas", [
    ({"name": "crop_flip", "crop_flip": {"scale": [0.35, 1.0]}}, CropFlip((0.35, 1.0)), (32, 32), 48, None),
    ({"name": "crop_flip", "crop_flip": {"scale": [0.08, 1.0]}}, CropFlip((0.08, 1.0)), (40, 56), 32, None),
    ({"name": "crop_flip", "crop_flip": {"scale": [0.35, 1.0]}}, CropFlip((0.35, 1.0)), (40, 56), 32, (64, 64)),
    ({"name": "crop_flip", "crop_flip": {"scale": [0.35, 1.0]}}, CropFlip((0.35, 1.0)), (8, 120), 32, None),  # fallback
    ({"name": "shift", "shift": {"translate": 0.1, "zoom": 0.1, "rotate": 10}}, Shift(0.1, 0.1, 10), (32, 32), 48,
     None),
    ({"name": "shift", "shift": {"translate": 0.1, "zoom": 0.1, "rotate": 10}}, Shift(0.1, 0.1, 10), (30, 44), 40,
     (48, 48)),
])
def test_batched_augmentation_draws_the_geometry_albumentations_draws(block, preset, hw, size, canvas):
    ref, ours = both_paths(block, preset, *hw, size, canvas)
    names = ["x<-x", "x<-y", "x0", "y<-x", "y<-y", "y0"]
    flipped, ours_flipped = ref[:, 0] < 0, ours[:, 0] < 0  # a mirrored sample reads x backwards
    assert abs(flipped.mean() - ours_flipped.mean()) < 0.1  # same flip rate (binomial sd of the gap: 0.03)
    for group, ours_group in ((flipped, ours_flipped), (~flipped, ~ours_flipped)):
        if group.sum() < 20:
            continue
        for k, name in enumerate(names):
            assert same_distribution(ref[group, k], ours[ours_group, k], 0.25 if name.endswith("0") else 0.01), name


def test_a_different_distribution_is_detected():
    """The check has power: a crop scale of (0.6, 1) against albumentations' (0.35, 1) fails it."""
    ref, ours = both_paths({"name": "crop_flip", "crop_flip": {"scale": [0.35, 1.0]}}, CropFlip((0.6, 1.0)),
                           32, 32, 48)
    assert not same_distribution(np.abs(ref[:, 0]), np.abs(ours[:, 0]), 0.01)


def test_a_whole_image_crop_is_albumentations_resize_pixel_for_pixel():
    """Pixel-centre conventions, exactly: a crop of the whole image (scale 1, ratio 1) is a plain resize, flipped
    or not; every batched output must equal albumentations' output or its mirror image."""
    img = np.random.default_rng(0).integers(0, 256, (24, 24, 3)).astype(np.uint8)
    t = train_transform(40, "bilinear", {"name": "crop_flip", "crop_flip": {"scale": [1.0, 1.0]}})
    t.set_random_seed(0)
    plain = {t(image=img)["image"].tobytes() for _ in range(20)}
    assert len(plain) == 2  # albumentations gives the resize and its mirror
    ref = np.stack([np.frombuffer(b, np.uint8).reshape(40, 40, 3) for b in plain]).astype(int)
    m = CropFlip((1.0, 1.0), (1.0, 1.0)).sample(16, (24, 24), 40, torch.Generator().manual_seed(0))
    ours = warp(torch.from_numpy(img.transpose(2, 0, 1).copy())[None].expand(16, -1, -1, -1), m, 40, "bilinear",
                "border").permute(0, 2, 3, 1).numpy().astype(int)
    for out in ours:
        assert min(np.abs(out - r).max() for r in ref) <= 1
    assert {int(np.abs(out - ref[0]).max() <= 1) for out in ours} == {0, 1}  # both orientations occur


def test_no_augment_is_the_eval_geometry():
    img = coordinate_image(30, 40)
    ref = train_transform(24, "bilinear", {"name": "none"})(image=img)["image"]
    ours = warp(torch.from_numpy(img.transpose(2, 0, 1).copy())[None], NoAugment().sample(1, (30, 40), 24, None),
                24, "bilinear", "border")[0].permute(1, 2, 0).numpy()
    assert np.abs(ref.astype(int) - ours.astype(int)).max() <= 2


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_unaugmented_batches_at_the_stored_size_are_what_the_warp_gives(mode):
    """No augmentation at the stored size skips resampling: the batch must be exactly the identity warp's."""
    images = torch.randint(0, 256, (12, 3, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    loader = ResidentTrainLoader(images, torch.arange(12), NoAugment(), 20, mode, batch_size=5, drop_last=False,
                                 seed=3)
    index = torch.tensor([7, 2, 9, 0, 11])
    got, labels = loader.batch(0, 0, index)
    expected = warp(images[index], NoAugment().sample(5, (20, 20), 20, None), 20, mode, "border")
    assert torch.equal(got, expected) and torch.equal(labels, index)
    shifted = ResidentTrainLoader(images, torch.arange(12), Shift(), 20, mode, batch_size=5, drop_last=False, seed=3)
    assert not torch.equal(shifted.batch(0, 0, index)[0], expected)  # an augmenting preset still resamples


# -- the datamodule: which path, what it yields ---------------------------------------------------------------------
def _dm(tmp_path, *overrides):
    from visionft.train import build

    dm, _, _ = build(compose_cfg(["data=synthetic", "backbone.name=test_resnet", "backbone.pretrained=false",
                                  "data.train_size=160", "data.test_size=40", "data.batch_size=16", *overrides],
                                 tmp_path / "run"))
    dm.setup()
    return dm


def test_resident_eval_batches_are_the_per_sample_eval_batches(tmp_path):
    """Val/test on the device are the per-sample pipeline's output, image for image (a folder of non-square PNGs:
    resize + centre crop), and the decoded folder is read back from the disk cache the second time."""
    from test_deploy import _labelled_folder

    from datamodules.imagefolder import ImageFolderDataModule

    root = _labelled_folder(tmp_path / "imgs", {"train": 4, "val": 3, "test": 3})
    kw = dict(root=str(root), batch_size=4, seed=0, cache_dir=str(tmp_path / "cache"), eval_crop_pct=0.875)
    dm = ImageFolderDataModule(resident="true", **kw)
    dm.configure(32, "bicubic")
    plain = ImageFolderDataModule(resident="false", **kw)
    plain.configure(32, "bicubic")
    for split in ("val", "test"):
        loader = getattr(dm, f"{split}_dataloader")()
        assert isinstance(loader, ResidentEvalLoader)
        ours = [b for b in loader]
        ref = [b for b in getattr(plain, f"{split}_dataloader")()]
        assert len(ours) == len(ref)
        for (x, y), (rx, ry) in zip(ours, ref):
            assert torch.equal(x, rx) and torch.equal(y, ry)
    assert len(list((tmp_path / "cache" / "images").glob("*.safetensors"))) == 4  # train (+ its sizes), val, test
    train = dm.train_dataloader()  # mixed shapes: one canvas, each image its own size
    assert (isinstance(train, ResidentTrainLoader) and train.sizes is not None
            and len(set(map(tuple, train.sizes.tolist()))) > 1)
    assert [tuple(x.shape) for x, _ in train] == [(4, 3, 32, 32)] * len(train)
    again = ImageFolderDataModule(resident="true", **kw)
    again.configure(32, "bicubic")
    again.setup()
    for split in again.splits.values():  # a hit must not decode any file
        split.load = lambda i: (_ for _ in ()).throw(AssertionError("decoded again"))
    assert torch.equal(next(iter(again.test_dataloader()))[0], ours[0][0])  # ours: the test split, last above


def test_resident_training_batches_match_the_per_sample_statistics(tmp_path):
    """Same data, same preset (crop_flip), two paths: an epoch's per-channel pixel mean and spread agree, every
    image is seen once per epoch in the same (seeded) order, and the labels ride along."""
    over = ["data.augment.name=crop_flip", "data.image_size=48"]
    dm, ref = _dm(tmp_path / "a", *over, "data.resident=true"), _dm(tmp_path / "b", *over, "data.resident=false")
    loader = dm.train_dataloader()
    assert isinstance(loader, ResidentTrainLoader)
    ours, theirs = list(loader), list(ref.train_dataloader())
    assert [torch.equal(a[1], b[1]) for a, b in zip(ours, theirs)] == [True] * len(theirs)  # same order, same labels
    x, rx = torch.cat([b[0] for b in ours]).float(), torch.cat([b[0] for b in theirs]).float()
    assert x.shape == rx.shape and x.dtype == rx.dtype
    torch.testing.assert_close(x.mean((0, 2, 3)), rx.mean((0, 2, 3)), atol=2.0, rtol=0)
    torch.testing.assert_close(x.std((0, 2, 3)), rx.std((0, 2, 3)), atol=2.0, rtol=0)


def test_resident_loader_spawns_no_worker_processes(tmp_path):
    import multiprocessing

    dm = _dm(tmp_path, "data.num_workers=2", "data.resident=true")
    for _ in dm.train_dataloader():
        assert multiprocessing.active_children() == []
    plain = _dm(tmp_path / "p", "data.num_workers=2", "data.resident=false")
    it = iter(plain.train_dataloader())
    next(it)
    assert multiprocessing.active_children()  # the check sees workers where there are some
    del it


def test_resident_auto_falls_back_and_true_refuses_in_one_line(tmp_path):
    dm = _dm(tmp_path, "data.resident=auto", "data.resident_max_mb=0")
    assert not isinstance(dm.train_dataloader(), ResidentTrainLoader)
    with pytest.raises(Exception, match=r"data.resident=true, but the decoded splits need .* MiB > "
                                        r"data.resident_max_mb=0: use data.resident=auto"):
        _dm(tmp_path / "t", "data.resident=true", "data.resident_max_mb=0").train_dataloader()


def _stripes(side: int) -> np.ndarray:
    """A fine pattern (period 6 px across, 8 px down) that a copy stored at the training size cannot hold."""
    yy, xx = np.mgrid[0:side, 0:side]
    wave = np.sin(2 * np.pi * xx / 6) * np.cos(2 * np.pi * yy / 8)
    return np.repeat(np.round(127.5 + 120 * wave).astype(np.uint8)[..., None], 3, -1)


def test_resident_crops_keep_the_resolution_the_smallest_crop_needs(tmp_path):
    """A 126 px photo trained at 32 px with crop_flip at its smallest scale (0.35): the resident copy keeps a
    shorter side of 63 px (a 0.35-area crop at ratio 4/3 is then 32 px high), and a resident crop equals the
    per-sample crop of the same box of the original (crop, then cv2 bicubic resize, as RandomResizedCrop does)."""
    import cv2
    from PIL import Image

    from datamodules import ImageFolderDataModule

    native = _stripes(126)
    for split in ("train", "val", "test"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            Image.fromarray(native).save(tmp_path / split / c / "0.png")
    preset = CropFlip(scale=(0.35, 0.35))
    dm = ImageFolderDataModule(root=str(tmp_path), resident="true", batch_size=2,
                               augment={"name": "crop_flip", "crop_flip": {"scale": [0.35, 0.35]}})
    dm.configure(32)
    stored, _, sizes = dm.resident_splits()["train"]
    side = min(stored.shape[-2:]) if sizes is None else int(sizes.min())
    assert side == 63, side
    n = 64
    matrices, box = preset.sample(n, tuple(stored.shape[-2:]), 32, torch.Generator().manual_seed(0))
    resident = warp(stored[:1].expand(n, -1, -1, -1), (matrices, box), 32, "bicubic", preset.padding)
    scale = 126 / stored.shape[-1]
    errors = []
    for i in range(n):
        x0, y0, x1, y1 = (int(round(float(v) * scale)) for v in (box[i, 0], box[i, 1], box[i, 2] + 1, box[i, 3] + 1))
        want = cv2.resize(native[y0:y1, x0:x1], (32, 32), interpolation=cv2.INTER_CUBIC)
        want = want[:, ::-1] if matrices[i, 0, 0] < 0 else want
        errors.append(np.abs(resident[i].permute(1, 2, 0).numpy().astype(float) - want).mean())
    assert np.mean(errors) < 12, np.mean(errors)


def test_resident_images_shrink_to_the_memory_budget_and_say_so(tmp_path, caplog):
    """When the side the crops need does not fit data.resident_max_mb, the largest side that fits is kept (never
    below the training size), and the log says what was given up."""
    import logging

    from PIL import Image

    from datamodules.resident import stored_side

    paths = []
    for i, (h, w) in enumerate([(126, 126), (100, 180)]):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(paths[-1])
    assert stored_side(paths, 32, 63, budget_mb=1.0) == 63

    def canvas_mb(s):  # both images' shorter sides reduced to s: canvas = 2 x 3 x max height x max width
        return 2 * 3 * s * round(180 * s / 100) / 2 ** 20

    budget = canvas_mb(50)
    with caplog.at_level(logging.WARNING):
        assert stored_side(paths, 32, 63, budget_mb=budget) == 50
    assert "shorter side of 50 px, not 63" in caplog.text and "upsampled" in caplog.text
    assert stored_side(paths, 32, 63, budget_mb=canvas_mb(20)) == 32  # below the training size: never
