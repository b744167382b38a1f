"""The cache folder (``paths.cache_dir``): ``features/`` (frozen-backbone features, ``visionft.features``) and
``images/`` (decoded images of the device-resident data path, image-check verdicts).

- Size cap: ``paths.cache_max_gb`` (``set_limit``; null: no cap). After every write, the least recently used files
  are removed until the folder fits. Reading an entry marks it used (its modification time is set to now).
- Temporary files: every entry is written to ``.<name>.<host>.<pid>.tmp`` beside it, then renamed into place. One
  left behind by a killed writer is removed by the next run once it is ``STALE_TMP_S`` old (a younger one may
  belong to a writer still at work).
- A folder that cannot be written (read-only, full, not a folder) is reported once, in one line, and the run goes
  on without caching: a cache costs speed, never the run.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from visionft.atomic import temporary
from visionft.errors import UsageError

log = logging.getLogger(__name__)
KINDS = ("features", "images")
DEFAULT_MAX_GB = 20.0
STALE_TMP_S = 30 * 60
_state: dict = {"max_gb": DEFAULT_MAX_GB}
_unwritable: set[str] = set()  # cache folders a write failed in: no further writes (and warnings) this process


def set_limit(max_gb) -> None:
    """The cap in GB (10^9 bytes) over all kinds; None: no cap."""
    if max_gb is not None and (isinstance(max_gb, bool) or not isinstance(max_gb, (int, float)) or max_gb < 0):
        raise UsageError(f"paths.cache_max_gb={max_gb!r} must be a number of GB >= 0 (or null: no cap)")
    _state["max_gb"] = None if max_gb is None else float(max_gb)


def limit_bytes() -> int | None:
    return None if _state["max_gb"] is None else int(_state["max_gb"] * 1e9)


tmp_path = temporary  # the cache's temporaries are named as every atomic write's (visionft.atomic)


def touch(path: Path) -> None:
    """Mark an entry as used now (least-recently-used eviction goes by modification time)."""
    try:
        os.utime(path)
    except OSError:
        pass  # a read-only cache is still read


def _files(root: Path):
    """(path, stat) of every file under the kinds' folders, temporaries included."""
    for kind in KINDS:
        for dirpath, _, names in os.walk(root / kind):
            for name in names:
                path = Path(dirpath) / name
                try:
                    yield path, path.stat()
                except OSError:
                    continue  # removed meanwhile by another process


def sweep_temporaries(root: str | Path | None, max_age_s: float = STALE_TMP_S) -> list[Path]:
    """Remove temporary files older than ``max_age_s`` (left by killed writers); the paths removed."""
    if not root:
        return []
    now, gone = time.time(), []
    for path, st in list(_files(Path(root).expanduser())):
        if path.name.endswith(".tmp") and now - st.st_mtime > max_age_s:
            try:
                path.unlink()
                gone.append(path)
            except OSError:
                pass
    if gone:
        log.info("removed %d stale temporary file(s) from the cache %s", len(gone), root)
    return gone


def usage(root: str | Path) -> dict[str, tuple[int, int]]:
    """kind -> (bytes, entries) of the finished entries (temporaries counted in ``tmp``)."""
    out = {kind: (0, 0) for kind in (*KINDS, "tmp")}
    root = Path(root).expanduser()
    for path, st in _files(root):
        kind = "tmp" if path.name.endswith(".tmp") else path.relative_to(root).parts[0]
        size, n = out[kind]
        out[kind] = (size + st.st_size, n + 1)
    return out


def evict(root: str | Path | None, keep: tuple[Path, ...] = ()) -> list[Path]:
    """Remove the least recently used entries until the cache fits ``limit_bytes()`` (temporaries count but are
    never removed here; nor is ``keep``, what was just written); the paths removed."""
    cap = limit_bytes()
    if not root or cap is None:
        return []
    root = Path(root).expanduser()
    files = list(_files(root))
    total = sum(st.st_size for _, st in files)
    gone = []
    for path, st in sorted(files, key=lambda f: f[1].st_mtime_ns):
        if total <= cap:
            break
        if path.name.endswith(".tmp") or path in keep:
            continue
        try:
            path.unlink()
        except OSError:
            continue
        total -= st.st_size
        gone.append(path)
        _remove_empty(path.parent, root)
    if gone:
        log.info("cache %s over paths.cache_max_gb=%s: removed the %d least recently used entries", root,
                 _state["max_gb"], len(gone))
    return gone


def _remove_empty(folder: Path, root: Path) -> None:
    while folder != root and folder.parent != root:  # a kind's own folder stays
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


def clear(root: str | Path, kinds=KINDS) -> int:
    """Remove every file of ``kinds``; the bytes freed."""
    import shutil

    root, freed = Path(root).expanduser(), 0
    for kind in kinds:
        freed += usage(root)[kind][0]
        shutil.rmtree(root / kind, ignore_errors=True)
    return freed


def writable(root: Path) -> bool:
    return str(root) not in _unwritable


def cannot_write(root: Path, path: Path, error: BaseException) -> None:
    """Report (once per cache folder) that ``path`` could not be written; later writes there are skipped."""
    if str(root) in _unwritable:
        return
    _unwritable.add(str(root))
    reason = getattr(error, "strerror", None) or str(error).splitlines()[0][:160] or type(error).__name__
    log.warning("cannot write the cache folder %s (%s, writing %s): continuing without caching; set "
                "paths.cache_dir to a writable folder with free space", root, reason, path.relative_to(root))


def save_tensors(root: Path, path: Path, tensors: dict, metadata: dict) -> bool:
    """Write a safetensors file atomically (temporary file, then rename); then evict over the cap. False (and one
    warning) when the cache cannot be written."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    if not writable(root):
        return False
    tmp = tmp_path(path)
    try:
        for attempt in (1, 2):  # another process's eviction may remove the emptied folder between mkdir and write
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                save_file(tensors, str(tmp), metadata=metadata)
                os.replace(tmp, path)
                break
            except (FileNotFoundError, SafetensorError):
                if attempt == 2 or path.parent.is_dir():
                    raise
    except (OSError, SafetensorError) as e:  # read-only, full, not a folder: the run goes on without the cache
        cannot_write(root, path, e)
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        return False
    evict(root, keep=(path,))
    return True
