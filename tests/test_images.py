"""A hostile image folder: every file's fate (used or rejected with its reason) and every loaded image's content,
through the datamodule, a training run (bad_images.csv, on_bad_image=error) and predict."""
from __future__ import annotations

import csv
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.imagefolder import ImageFolderDataModule
from datamodules.images import BadImage, check_files, read_rgb

RED, GREEN, BLUE = (200, 30, 30), (30, 200, 30), (30, 30, 200)


def _png_claiming(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height (a decompression bomb's signature) with one tiny data chunk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
                     + chunk(b"IEND", b""))


def _jpeg_bytes(color, size=(16, 12), exif=None) -> bytes:
    b = io.BytesIO()
    Image.new("RGB", size, color).save(b, "JPEG", quality=95, **({"exif": exif} if exif else {}))
    return b.getvalue()


def hostile_folder(root: Path) -> dict[str, tuple[str, object]]:
    """root/<class>/... ; returns {relative path: ("ok", expected (H, W, first-pixel RGB)) or ("bad", reason part)}."""
    for c in ("red", "green", "blue", "empty class", ".ipynb_checkpoints"):
        (root / c).mkdir(parents=True)
    fates = {}

    def ok(rel, shape_rgb):
        fates[rel] = ("ok", shape_rgb)

    Image.new("RGB", (10, 8), RED).save(root / "red" / "plain photo ü (1).png")
    ok("red/plain photo ü (1).png", (8, 10, RED))
    (root / "red" / "zero.jpg").write_bytes(b"")
    fates["red/zero.jpg"] = ("bad", "empty file")
    (root / "red" / "notes.jpg").write_text("this is text, not a JPEG")
    fates["red/notes.jpg"] = ("bad", "not an image")
    (root / "red" / "truncated.jpg").write_bytes(_jpeg_bytes(RED, (64, 64))[:300])
    fates["red/truncated.jpg"] = ("bad", "runcated")
    _png_claiming(root / "red" / "huge.png", 30000, 30000)
    fates["red/huge.png"] = ("bad", "too large")
    sixteen = np.full((6, 5), 32768, np.uint16)  # mid-gray in 16 bits: 32768 / 257 = 127.5 -> 128
    Image.fromarray(sixteen).save(root / "green" / "gray16.png")
    ok("green/gray16.png", (6, 5, (128, 128, 128)))
    frames = [Image.new("RGB", (7, 7), GREEN), Image.new("RGB", (7, 7), BLUE)]
    frames[0].save(root / "green" / "animated.gif", save_all=True, append_images=frames[1:])
    ok("green/animated.gif", (7, 7, GREEN))  # the first frame (GIF palette keeps these exact colours)
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255  # red, fully transparent: composited on white
    Image.fromarray(rgba, "RGBA").save(root / "green" / "transparent.png")
    ok("green/transparent.png", (4, 4, (255, 255, 255)))
    Image.new("CMYK", (5, 5), (0, 255, 255, 0)).save(root / "blue" / "cmyk.jpg", quality=100)
    ok("blue/cmyk.jpg", (5, 5, (255, 0, 0)))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    (root / "blue" / "rotated.jpg").write_bytes(_jpeg_bytes(BLUE, (16, 12), exif.tobytes()))
    ok("blue/rotated.jpg", (16, 12, BLUE))  # stored 16 wide x 12 high, displayed 12 wide x 16 high
    Image.fromarray(np.full((3, 3), 0.5, np.float32)).save(root / "blue" / "float.tif")
    ok("blue/float.tif", (3, 3, (128, 128, 128)))
    Image.new("P", (4, 4), 3).save(root / "blue" / "palette.bmp")
    ok("blue/palette.bmp", (4, 4, None))
    Image.new("RGB", (4, 4), BLUE).save(root / ".ipynb_checkpoints" / "copy.png")  # hidden: not a class
    Image.new("RGB", (4, 4), BLUE).save(root / "blue" / ".hidden.png")  # hidden file: ignored
    return fates


def _close(a, b, tol=3):
    return b is None or all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b))


def test_reader_and_check_give_every_file_its_fate(tmp_path):
    fates = hostile_folder(tmp_path / "f")
    paths = [str(tmp_path / "f" / rel) for rel in fates]
    rejected = check_files(paths, cache_dir=tmp_path / "cache", progress=False)
    for rel, (fate, expected) in fates.items():
        path = str(tmp_path / "f" / rel)
        if fate == "bad":
            assert expected in rejected[path], (rel, rejected.get(path))
            with pytest.raises(BadImage):
                read_rgb(path)
        else:
            assert path not in rejected, (rel, rejected[path])
            image = read_rgb(path)
            h, w, rgb = expected
            assert image.dtype == np.uint8 and image.shape == (h, w, 3), (rel, image.shape)
            assert _close(image[0, 0], rgb, tol=6 if rel.endswith(".jpg") else 1), (rel, image[0, 0])


def test_second_check_reads_only_changed_files(tmp_path, monkeypatch):
    import datamodules.images as images

    fates = hostile_folder(tmp_path / "f")
    paths = [str(tmp_path / "f" / rel) for rel in fates]
    first = check_files(paths, cache_dir=tmp_path / "cache", progress=False)
    seen = []
    real = images._verdict
    monkeypatch.setattr(images, "_verdict", lambda p: seen.append(p) or real(p))
    assert check_files(paths, cache_dir=tmp_path / "cache", progress=False) == first and seen == []
    Image.new("RGB", (4, 4), RED).save(tmp_path / "f" / "red" / "zero.png")  # new content at a new path
    (tmp_path / "f" / "red" / "zero.jpg").write_bytes(_jpeg_bytes(RED))  # a bad file repaired
    again = check_files(paths, cache_dir=tmp_path / "cache", progress=False)
    assert seen == [str(tmp_path / "f" / "red" / "zero.jpg")] and str(tmp_path / "f" / "red" / "zero.jpg") not in again


def test_datamodule_skips_bad_files_ignores_hidden_and_empty_classes(tmp_path, caplog):
    fates = hostile_folder(tmp_path / "f")
    dm = ImageFolderDataModule(root=str(tmp_path / "f"), cache_dir=str(tmp_path / "cache"), val_fraction=0.2,
                               test_fraction=0.2)
    dm.setup()
    assert dm.classes == ["blue", "green", "red"]  # no hidden folder, no empty class
    assert "empty class" in caplog.text
    used = {p for s in dm.splits.values() for p in s.images}
    good = {str(tmp_path / "f" / rel) for rel, (fate, _) in fates.items() if fate == "ok"}
    assert used == good and set(dm.rejected) == {str(tmp_path / "f" / r) for r, (f, _) in fates.items() if f == "bad"}
    with pytest.raises(ValueError, match=r"4 unusable image file\(s\).*data.on_bad_image=skip"):
        ImageFolderDataModule(root=str(tmp_path / "f"), on_bad_image="error").setup()


def test_a_run_lists_skipped_files_and_predict_uses_the_same_reader(tmp_path):
    from conftest import TINY, compose_cfg

    from visionft.predict import predict_images, preprocessing_of
    from visionft.train import train

    fates = hostile_folder(tmp_path / "f")
    tiny = [o for o in TINY if not o.startswith(("data=", "data.train_size", "data.test_size"))]
    m = train(compose_cfg([*tiny, "data=imagefolder", f"data.root={tmp_path / 'f'}", "data.num_workers=0",
                           "data.image_size=32", "data.val_fraction=0.2", "data.test_fraction=0.2"], tmp_path / "run"))
    rows = list(csv.DictReader(open(tmp_path / "run" / "bad_images.csv")))
    assert {r["path"] for r in rows} == {str(tmp_path / "f" / r) for r, (f, _) in fates.items() if f == "bad"}
    assert all(r["reason"] for r in rows) and m["data"]["train"] + m["data"]["val"] + m["data"]["test"] == 8
    meta = {"image_size": 32, "interpolation": "bilinear", "crop_pct": 1.0, "mean": [0.5] * 3, "std": [0.5] * 3,
            "classes": ["a", "b", "c"]}
    items = [(rel, str(tmp_path / "f" / rel)) for rel in fates]
    rows, failed = predict_images(lambda x: x.mean((2, 3)), preprocessing_of(meta), items, topk=1)
    assert {k for k, _ in failed} == {r for r, (f, _) in fates.items() if f == "bad"} and len(rows) == 8


def test_colour_key_transparency_and_wide_integer_images(tmp_path):
    keyed = Image.new("RGB", (4, 4), (10, 20, 30))
    keyed.info["transparency"] = (10, 20, 30)  # a tRNS colour key: that colour is transparent
    keyed.save(tmp_path / "keyed.png", transparency=(10, 20, 30))
    assert tuple(read_rgb(tmp_path / "keyed.png")[0, 0]) == (255, 255, 255)
    Image.fromarray(np.full((3, 3), 200, np.int32), "I").save(tmp_path / "i32.tif")  # 32-bit holding 0-255 values
    assert tuple(read_rgb(tmp_path / "i32.tif")[0, 0]) == (200, 200, 200)
    (tmp_path / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    rejected = check_files([str(tmp_path / "dangling.png"), str(tmp_path / "keyed.png")], progress=False)
    assert list(rejected) == [str(tmp_path / "dangling.png")]


def test_preflight_lets_valid_commands_through_and_types_top_level_keys(tmp_path):
    from visionft.preflight import check

    (tmp_path / "backbone").mkdir()
    (tmp_path / "backbone" / "mine.yaml").write_text("defaults:\n  - timm\n  - _self_\nname: test_resnet\n")
    assert check([f"hydra.searchpath=[file://{tmp_path}]", "backbone=mine"]) is None
    assert check(["--config-dir", str(tmp_path), "backbone=mine"]) is None
    assert check(["-m", "strategy.lr=1e-3,1e-4", "+loss.extra=1", "~export"]) is None
    assert check(["seed=abc"]) == "seed=abc must be int (the default is 42)"
