"""Frozen-backbone features, embedded once per image and cached on disk (nothing in the cache is ever unpickled or
executed: plain tensors in safetensors files).

``FeatureStore`` keeps features per image, so that any split of the same images (another ``data.seed``, a few-shot
subset, a split moved between train and val) is assembled from rows already embedded. One folder per configuration,
``<cache_dir>/features/<key hash>/``, whose key holds everything that changes the features besides the image: the
backbone's name, options and a hash of its weights, the transform, the image size, mean/std, the precision, the
device type (and TF32 flags), the torch, timm, Pillow, OpenCV and albumentations versions, and the format version.
In it, blocks of rows (``<rows hash>.safetensors``: ``x`` the features, ``ids`` a 32-byte id per row), each written
in one piece by the run that embedded them. A row's id is a SHA-256 of its image (file: absolute path, size and
modification time, as make does; in memory: its pixels) and, for an augmented view, the view's index, seed and the
image's position (``datamodules.loaders.SeededDataset`` seeds a view by them). The index (id -> block, row) is read
from the blocks' ``ids`` each run. Each block stores its configuration key and a SHA-256 of its tensors: a block whose
key differs (a hash collision) or whose tensors do not match their checksum (a truncated or corrupt write) is reported
and removed, and its rows are embedded again, never used. Blocks are written to a temporary file and renamed into
place, so a crash leaves whole blocks or none. ``FeatureCache`` stores whole entries the same way (the decoded images
of ``datamodules.resident``). Size cap, eviction and unwritable folders: ``visionft.cachedir``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from visionft import cachedir
from visionft.features import Features, file_id

log = logging.getLogger(__name__)
FORMAT = 4  # bump when the way features are computed or stored changes (image reading, pre-logit definition, layout)
ID_BYTES = 32


def image_ids(images) -> list[bytes]:
    """A 32-byte id per image: SHA-256 of its file's path, size and mtime, or of an in-memory image's pixels."""
    if isinstance(images, np.ndarray):
        head = f"pixels|{images.dtype}|{images.shape[1:]}|".encode()
        return [hashlib.sha256(head + np.ascontiguousarray(im).tobytes()).digest() for im in images]
    return [hashlib.sha256(os.fsencode(f"file|{file_id(p)}")).digest() for p in images]


def view_ids(ids: Sequence[bytes], views: int, seed: int) -> list[bytes]:
    """Ids of ``views`` augmented views of each image, view-major (row k * n + i: view k of image i), as
    ``probe._SeededViews`` orders them; a view is drawn from (seed, k, i), so all three are in its id."""
    return [hashlib.sha256(b"view|%d|%d|%d|" % (k, seed, i) + ids[i]).digest()
            for k in range(views) for i in range(len(ids))]


def versions() -> dict[str, str]:
    """The versions of the libraries that read, resize and embed images (any of them can change the pixels)."""
    import albumentations
    import cv2
    import PIL
    import timm

    return {"torch": torch.__version__, "timm": timm.__version__, "pillow": PIL.__version__, "cv2": cv2.__version__,
            "albumentations": albumentations.__version__}


def _key_json(key: dict) -> str:
    return json.dumps({"format": FORMAT, **key}, sort_keys=True)


def _checksum(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _open(path: Path, want: str, names: tuple[str, ...]) -> dict[str, torch.Tensor] | None:
    """The named tensors of a cache file whose key is ``want``, or None (reported, the file removed) when it is
    unreadable, written for another key or fails its checksum (``("ids",)`` alone, the index: checked when the rows
    are read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            out = {n: f.get_tensor(n) for n in names}
    except FileNotFoundError:
        return None  # evicted by another process meanwhile
    except Exception as e:  # noqa: BLE001 - any unreadable entry (truncated, garbage) is rebuilt, not used
        return _bad(path, f"is unreadable ({str(e).splitlines()[0][:120]})")
    if meta.get("key") != want:
        return _bad(path, "belongs to another configuration", remove=False)
    if names != ("ids",) and meta.get("sha256") != _checksum(*out.values()):
        return _bad(path, "is corrupt (checksum mismatch)")
    return out


def _bad(path: Path, why: str, remove: bool = True) -> None:
    log.warning("feature cache %s %s: embedding again", path, why)
    if remove:
        try:
            path.unlink()
        except OSError:
            pass
    return None


class FeatureCache:
    """Whole entries: ``read(key)``: the cached tensors for ``key`` (a JSON-able dict) or None; ``write(key,
    features)`` stores them. ``root=None``: no disk cache. ``kind``: the subfolder (``images``: decoded images of the
    device-resident data path)."""

    def __init__(self, root: str | Path | None, kind: str = "images") -> None:
        self.base = Path(root).expanduser() if root else None
        self.root = self.base / kind if self.base else None
        cachedir.sweep_temporaries(self.base)

    def path(self, key: dict) -> Path | None:
        if self.root is None:
            return None
        return self.root / f"{hashlib.sha256(_key_json(key).encode()).hexdigest()[:32]}.safetensors"

    def read(self, key: dict) -> Features | None:
        path = self.path(key)
        got = _open(path, _key_json(key), ("x", "y")) if path is not None and path.is_file() else None
        if got is None:
            return None
        cachedir.touch(path)
        log.info("read from cache: %s %s", path.name, tuple(got["x"].shape))
        return Features(got["x"], got["y"], hit=True)

    def write(self, key: dict, feats: Features) -> None:
        path = self.path(key)
        if path is not None:
            meta = {"key": _key_json(key), "sha256": _checksum(feats.x, feats.y)}
            cachedir.save_tensors(self.base, path, {"x": feats.x, "y": feats.y}, meta)


class FeatureStore:
    """Features per image: ``read(key, ids)`` -> (rows, found) for the rows whose id is cached under the
    configuration ``key``; ``write(key, ids, x)`` stores new rows as one block. ``root=None``: no disk cache."""

    def __init__(self, root: str | Path | None) -> None:
        self.base = Path(root).expanduser() if root else None
        cachedir.sweep_temporaries(self.base)

    def folder(self, key: dict) -> Path | None:
        if self.base is None:
            return None
        return self.base / "features" / hashlib.sha256(_key_json(key).encode()).hexdigest()[:32]

    def _index(self, folder: Path, want: str) -> dict[bytes, tuple[Path, int]]:
        index = {}
        try:
            blocks = sorted(folder.glob("*.safetensors"))
        except OSError:
            return index
        for block in blocks:
            got = _open(block, want, ("ids",))
            if got is not None:
                raw = got["ids"].numpy().tobytes()
                index.update({raw[i:i + ID_BYTES]: (block, i // ID_BYTES) for i in range(0, len(raw), ID_BYTES)})
        return index

    def read(self, key: dict, ids: Sequence[bytes]) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(x, found): x (len(ids), D) holds the cached rows where ``found`` (None when no row is cached)."""
        found = torch.zeros(len(ids), dtype=torch.bool)
        folder = self.folder(key)
        if folder is None or not folder.is_dir():
            return None, found
        want = _key_json(key)
        index = self._index(folder, want)
        wanted: dict[Path, tuple[list[int], list[int]]] = {}
        for pos, i in enumerate(ids):
            if i in index:
                block, row = index[i]
                wanted.setdefault(block, ([], []))[0].append(pos)
                wanted[block][1].append(row)
        x = None
        for block, (pos, rows) in wanted.items():
            got = _open(block, want, ("x", "ids"))
            if got is None:
                continue
            cachedir.touch(block)
            x = got["x"].new_zeros(len(ids), got["x"].shape[1]) if x is None else x
            x[pos] = got["x"][rows]
            found[pos] = True
        if found.any():
            log.info("read from cache: %d of %d rows from %s", int(found.sum()), len(ids), folder.name)
        return x, found

    def write(self, key: dict, ids: Sequence[bytes], x: torch.Tensor) -> None:
        folder = self.folder(key)
        if folder is None or not len(ids):
            return
        raw = b"".join(ids)
        id_tensor = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(-1, ID_BYTES)
        x = x.contiguous()
        meta = {"key": _key_json(key), "sha256": _checksum(x, id_tensor)}
        path = folder / f"{hashlib.sha256(raw).hexdigest()[:32]}.safetensors"
        cachedir.save_tensors(self.base, path, {"x": x, "ids": id_tensor}, meta)
