"""What a run's splits hold, in the plain form a checkpoint keeps (``of``), and what changed since (``differences``):
the class names and, per split, its image count, its per-class counts, a hash of the whole split and (up to
``KEYS_KEPT`` images) one 64-bit key per image. An image's key hashes its file path relative to the data root with its
class name (a file added, removed, renamed, moved or relabelled changes it; a file rewritten in place does not), or,
for images held in memory, its pixels with its label."""
from __future__ import annotations

import hashlib
import os

import numpy as np
import torch

from visionft.logs import printable

KEYS_KEPT = 100_000  # per split: 8 bytes an image in every checkpoint; beyond it, the split's hash and counts only
SHOWN = 3  # new files named in a difference


def _key(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def relative(path: str, root: str | None) -> str:
    prefix = root.rstrip(os.sep) + os.sep if root else None
    return path[len(prefix):] if prefix and path.startswith(prefix) else path


def item_keys(split, classes: list[str], root: str | None) -> tuple[np.ndarray, list[str] | None]:
    """The split's image keys, sorted, and (images as files) their paths relative to ``root`` in the same order."""
    if isinstance(split.images, np.ndarray):
        names = None
        keys = [_key(np.int64(y).tobytes() + np.ascontiguousarray(im).tobytes())
                for im, y in zip(split.images, split.labels)]
    else:
        names = [relative(str(p), root) for p in split.images]
        keys = [_key(os.fsencode(f"{classes[y]}\0{n}")) for n, y in zip(names, split.labels)]  # a name's own bytes
    keys = np.asarray(keys, dtype=np.int64)
    order = np.argsort(keys, kind="stable")
    return keys[order], [names[i] for i in order] if names is not None else None


def of(splits: dict, classes: list[str], root: str | None) -> dict:
    """The fingerprint of ``splits`` (split -> ``Split``): plain types and int64 tensors, as weights-only loads take."""
    out = {}
    for name, split in splits.items():
        keys, _ = item_keys(split, classes, root)
        out[name] = {"images": len(split),
                     "per_class": np.bincount(split.labels, minlength=len(classes)).tolist(),
                     "hash": hashlib.blake2b(keys.tobytes(), digest_size=16).hexdigest(),
                     "keys": torch.from_numpy(keys) if len(keys) <= KEYS_KEPT else None}
    return {"classes": list(classes), "splits": out}


def differences(then: dict, splits: dict, classes: list[str], root: str | None) -> list[str]:
    """One phrase per difference between the fingerprint ``then`` and the splits now: the class names, and each
    split whose images differ (its count then and now; with per-image keys, how many images are gone and new, naming
    the first new files)."""
    now, out = of(splits, classes, root), []
    if then.get("classes") != now["classes"]:
        old = list(then.get("classes") or [])
        gone, new = [c for c in old if c not in classes], [c for c in classes if c not in old]
        out.append(f"classes: {len(old)} -> {len(classes)}" + (f", gone {gone}" if gone else "")
                   + (f", new {new}" if new else "") + ("" if gone or new else " (renamed or reordered)"))
    for name in [*now["splits"], *(s for s in then.get("splits", {}) if s not in now["splits"])]:
        a, b = then.get("splits", {}).get(name), now["splits"].get(name)
        if a is None or b is None:
            out.append(f"{name}: {a['images'] if a else 'no'} -> {b['images'] if b else 'no'} images")
        elif a.get("hash") != b["hash"]:
            out.append(f"{name}: {a['images']} -> {b['images']} images, " + _which(a, splits[name], classes, root))
    return out


def _which(then: dict, split, classes: list[str], root: str | None) -> str:
    if then.get("keys") is None or len(split) > KEYS_KEPT:
        return "other images"
    keys, names = item_keys(split, classes, root)
    old = set(then["keys"].tolist())
    new = [i for i, k in enumerate(keys.tolist()) if k not in old]
    gone = len(old - set(keys.tolist()))
    shown = sorted(printable(names[i]) for i in new)[:SHOWN] if names is not None else []
    return (f"{gone} gone and {len(new)} new" + (f" (new: {', '.join(shown)}{', ...' if len(new) > SHOWN else ''})"
                                                  if shown else ""))
