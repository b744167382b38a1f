"""Reading a class-folder tree exactly: which folder is which split, which folder is which class, and which files
are images — each file counted once, by its real path.

- Splits: ``train/`` with ``val/`` (or Roboflow's ``valid/``, HF's ``validation/``) and ``test/``; a root without
  ``train/`` is one flat split.
- Classes: the training split's visible folders. Folder names that differ only in case (``Cat`` and ``cat``) are an
  error in any split; a class folder in ``val/`` or ``test/`` that training lacks is an error, never dropped.
- Files: symlinked folders are followed, except a link back to a folder above it (a cycle) or to a folder already
  walked; a file reached by several paths (links) is counted once, where it really lies, or else at its first path.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from visionft.errors import UsageError

log = logging.getLogger(__name__)
SPLIT_FOLDERS = {"val": ("val", "valid", "validation"), "test": ("test",)}


def find_splits(root: Path) -> dict[str, Path]:
    """split -> folder: ``train/`` and the val/test folders beside it, or ``{"train": root}`` for a flat folder."""
    if not (root / "train").is_dir():
        return {"train": root}
    layout = {"train": root / "train"}
    for split, names in SPLIT_FOLDERS.items():
        found = [n for n in names if (root / n).is_dir()]
        if len(found) > 1:
            raise UsageError(f"{root} has {' and '.join(f'{n}/' for n in found)}: both would be the {split} split; "
                             f"keep one of them (rename or move the other)")
        if found:
            layout[split] = root / found[0]
            if found[0] != split:
                log.info("%s/ is the %s split", found[0], split)
    return layout


def split_names(layout: dict[str, Path], root: Path) -> dict[str, str]:
    """What each split is called in a run's record: its folder (``train/``, ``valid/``), or the data root for a flat
    folder of class folders."""
    if layout["train"] == root:
        return {"train": f"{root} (class folders, no train/ folder)"}
    return {s: f"{folder.name}/" for s, folder in layout.items()}


def class_folders(folder: Path) -> list[str]:
    """The visible sub-folders of ``folder``, sorted; names that differ only in case are an error."""
    names = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    by_case: dict[str, list[str]] = {}
    for n in names:
        by_case.setdefault(n.casefold(), []).append(n)
    clashes = [group for group in by_case.values() if len(group) > 1]
    if clashes:
        pairs = "; ".join(" and ".join(repr(n) for n in group) for group in clashes)
        raise UsageError(f"class folders under {folder} differ only in case ({pairs}): they would be separate classes; "
                         f"merge them into one folder or rename one")
    return names


def at_least_two(root: Path, train: Path, classes: list[str], empty: list[str] = ()) -> None:
    """A UsageError when training would have exactly one class: there is nothing to tell apart (and the metrics
    refuse one class). ``empty``: class folders left out for want of a usable image. None at all is not this error."""
    if len(classes) != 1:
        return
    where = "" if train == root else f" in {train.name}/"
    without = f"; {', '.join(map(repr, empty))} {'has' if len(empty) == 1 else 'have'} no usable image" if empty else ""
    raise UsageError(f"data.root={root} has one class{where} ({classes[0]}{without}): classification needs at least "
                     f"two class folders, {train}/<class>/<image>; add a folder of images for each other class")


def _is_cycle(target: str, here: str) -> bool:
    return here == target or here.startswith(target.rstrip(os.sep) + os.sep)


def walk_images(folder: Path, extensions: set[str]) -> dict[str, str]:
    """Visible image files under ``folder`` (sorted walk) -> their real paths. Linked folders are followed once; a
    link to the folder itself or one above it (a cycle) is never followed, and logged. Each folder is resolved once;
    a file's own real path is resolved only when the file is itself a link."""
    out, walked = {}, {os.path.realpath(folder)}
    for here, dirs, files in os.walk(folder, followlinks=True):
        real, keep = os.path.realpath(here), []
        for d in sorted(dirs):
            if d.startswith("."):
                continue
            target = os.path.realpath(os.path.join(here, d))
            if _is_cycle(target, real):
                log.warning("symlink loop not followed: %s -> %s", os.path.join(here, d), target)
            elif target not in walked:
                walked.add(target)
                keep.append(d)
        dirs[:] = keep
        for f in sorted(files):
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in extensions:
                path = os.path.join(here, f)
                out[path] = os.path.realpath(path) if os.path.islink(path) else os.path.join(real, f)
    return out


def unknown_classes(folder: Path, classes: list[str], extensions: set[str]) -> None:
    """Error when ``folder`` (a val or test split) has class folders holding images that training lacks."""
    known = {c.casefold(): c for c in classes}
    extra = [n for n in class_folders(folder) if n not in classes and walk_images(folder / n, extensions)]
    if not extra:
        return
    named = ", ".join(f"{n!r} (train has {known[n.casefold()]!r}: the names differ only in case)"
                      if n.casefold() in known else repr(n) for n in extra)
    shown = ", ".join(classes[:20]) + (f", ... ({len(classes)} in all)" if len(classes) > 20 else "")
    raise UsageError(f"{folder.name}/ has class folder(s) that train/ lacks: {named}; the training classes are: "
                     f"{shown}. Rename each to its training class, or remove it")


def count_once(scans: dict[str, dict[str, dict[str, str]]], layout: dict[str, Path]) -> dict[str, dict[str, list[str]]]:
    """Each real file once (``scans``: split -> class -> {path: real path}). It belongs to the class whose real
    folder holds it (the innermost, splits in train, val, test order), reached by any of its paths; a file outside
    every class folder goes to its first path. Duplicates are logged."""
    homes: dict[str, tuple[str, str]] = {}
    for s, files in scans.items():  # a real folder shared by two splits or classes: the first (train, val, test)
        for c in files:
            homes.setdefault(os.path.realpath(layout[s] / c), (s, c))
    seen = [(s, c, p, r) for s, files in scans.items() for c, paths in files.items() for p, r in paths.items()]
    home: dict[str, tuple[str, str] | None] = {}
    for r in {os.path.dirname(r) for _, _, _, r in seen}:
        up = r
        while up not in homes and os.path.dirname(up) != up:  # the innermost class folder above it
            up = os.path.dirname(up)
        home[r] = homes.get(up)
    owner: dict[str, tuple[str, str, str]] = {}
    for s, c, p, r in seen:
        if home[os.path.dirname(r)] in (None, (s, c)):
            owner.setdefault(r, (s, c, p))
    for s, c, p, r in seen:  # its class folder was reached only through another class's link
        owner.setdefault(r, (s, c, p))
    kept: dict[str, dict[str, list[str]]] = {s: {c: [] for c in files} for s, files in scans.items()}
    for s, c, p, r in seen:
        if owner[r] == (s, c, p):
            kept[s][c].append(p)
    dropped = [(p, owner[r][2]) for s, c, p, r in seen if owner[r][2] != p]
    if dropped:
        example = "; ".join(f"{p} is {q}" for p, q in dropped[:3])
        log.warning("%d image path(s) reach a file already counted through symlinks: each file is counted once, in "
                    "the class folder that holds it (%s%s)", len(dropped), example, "; ..." if len(dropped) > 3 else "")
    return kept
