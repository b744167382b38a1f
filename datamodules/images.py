"""Reading users' image files, and checking a folder of them before training.

``read_rgb`` turns any file PIL opens into an RGB uint8 array the same way for training, evaluation, ``predict`` and
``embed``: EXIF orientation applied; the first frame of animated or multi-page files (GIF, APNG, TIFF); alpha
composited on a white background (``BACKGROUND``); 16-bit, 32-bit and float images scaled to 0-255 (16-bit by
/257, float by its [0, 1] range or clipped); palette, CMYK, gray and other modes converted to RGB. Files larger
than ``MAX_PIXELS`` are reported, never decoded (a decompression bomb cannot exhaust memory). Anything unreadable
raises ``BadImage`` with the reason.

``check_files`` reads every file once, in parallel with a progress bar, and remembers each verdict in a cache keyed
by path, size and modification time, so a second run re-checks only what changed (under ``<cache_dir>/images``,
within ``paths.cache_max_gb``: ``visionft.cachedir``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from visionft.errors import UserError

log = logging.getLogger(__name__)
BACKGROUND = (255, 255, 255)  # transparent pixels become white
MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold (about 9,459 x 9,459)
CHECK_FORMAT = 2  # bump when read_rgb's verdicts change


class BadImage(UserError, ValueError):
    """A file that cannot be used as an image; the message is the reason."""


def image_extensions() -> set[str]:
    """Every file extension of a format PIL can open."""
    Image.init()
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def _to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im).astype(np.float64)
        top = a.max(initial=0)
        if im.mode.startswith("I;16") or 255 < top <= 65535:
            a = a / 257.0  # 16-bit range
        elif top > 65535:
            a = a * (255.0 / top)  # a wider integer range: scaled by its maximum
        return np.repeat(np.clip(np.rint(a), 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
    if im.mode == "F":
        a = np.nan_to_num(np.asarray(im, dtype=np.float64))
        a = a * 255.0 if a.min(initial=0) >= 0 and a.max(initial=0) <= 1.0 else a
        return np.repeat(np.clip(np.rint(a), 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or getattr(im, "has_transparency_data", False):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return np.asarray(Image.alpha_composite(canvas, rgba).convert("RGB"))
    return np.asarray(im.convert("RGB"))


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """An RGB uint8 (H, W, 3) array of any image file PIL opens; ``BadImage`` naming the reason otherwise."""
    path = str(path)
    try:
        if os.path.getsize(path) == 0:
            raise BadImage("empty file (0 bytes)")
        with Image.open(path) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise BadImage(f"too large to decode safely ({w}x{h} pixels > {MAX_PIXELS:,}); downscale it")
            if getattr(im, "n_frames", 1) > 1:
                im.seek(0)  # the first frame of an animation or a multi-page file
            im.load()
            return np.ascontiguousarray(_to_rgb(ImageOps.exif_transpose(im)))
    except BadImage:
        raise
    except Image.DecompressionBombError as e:
        raise BadImage(f"too large to decode safely ({e})") from None
    except (OSError, SyntaxError, ValueError, Image.UnidentifiedImageError) as e:
        reason = "not an image PIL can read" if isinstance(e, Image.UnidentifiedImageError) else str(e)
        raise BadImage(reason.replace(path, "").strip(" '\":") or type(e).__name__) from None


def _verdict(path: str) -> str | None:
    try:
        read_rgb(path)
        return None
    except BadImage as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - any failure to decode one file is that file's verdict, not the run's
        return f"{type(e).__name__}: {e}"


def check_files(paths: list[str], cache_dir: str | os.PathLike | None = None, workers: int | None = None,
                progress: bool = True) -> dict[str, str]:
    """Read every file once (in parallel); return {path: reason} for the files that cannot be used. Verdicts are
    cached under ``<cache_dir>/images/`` by path, size and modification time."""
    from tqdm.auto import tqdm

    from visionft.cachedir import sweep_temporaries

    stamps = {p: _stamp(p) for p in paths}
    cache_file = _cache_file(cache_dir, paths)
    sweep_temporaries(cache_dir)
    known = _read_cache(cache_file)
    todo = [p for p in paths if known.get(p, [None])[0] != stamps[p]]
    if todo:
        with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
            verdicts = list(tqdm(pool.map(_verdict, todo), total=len(todo), desc="checking images", leave=False,
                                 disable=not progress or None))
        known.update({p: [stamps[p], v] for p, v in zip(todo, verdicts)})
        _write_cache(cache_file, {p: known[p] for p in paths})
    return {p: known[p][1] for p in paths if known[p][1] is not None}


def _stamp(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:  # a dangling link: read_rgb reports it
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}"


def _cache_file(cache_dir, paths: list[str]) -> Path | None:
    if not cache_dir or not paths:
        return None
    root = os.path.commonpath([os.path.abspath(p) for p in paths])
    digest = hashlib.sha256(os.fsencode(f"{CHECK_FORMAT}|{root}")).hexdigest()[:24]
    return Path(cache_dir).expanduser() / "images" / f"{digest}.json"


def _read_cache(path: Path | None) -> dict:
    if path is None or not path.is_file():
        return {}
    from visionft import cachedir

    try:
        known = dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}  # a damaged cache only costs a re-check
    cachedir.touch(path)
    return known


def _write_cache(path: Path | None, verdicts: dict) -> None:
    from visionft import cachedir

    if path is None:
        return
    root, tmp = path.parent.parent, cachedir.tmp_path(path)
    if not cachedir.writable(root):
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(verdicts))
        os.replace(tmp, path)
    except OSError as e:  # read-only, full: the run goes on without the cache (reported once)
        cachedir.cannot_write(root, path, e)
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        return
    cachedir.evict(root, keep=(path,))
