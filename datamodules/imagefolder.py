"""A folder of images: ``root/{train,val,test}/<class>/*`` or one ``root/<class>/*`` split by seeded fractions
(``datamodules.folders`` reads the tree: split and class folders, symlinks, each file once).

Every file is checked before training (``datamodules.images.check_files``: parallel, cached): with
``on_bad_image=skip`` (default) unusable files are left out and listed with their reason in ``rejected`` (a run
writes them to ``bad_images.csv``); with ``error`` the run stops before training with that list. Hidden files and
folders (``.ipynb_checkpoints``, ``.DS_Store``, ``._x.jpg``) are ignored; a class folder without a usable image is
ignored with a warning."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from datamodules import folders
from datamodules.base import ClassificationDataModule, Split
from datamodules.images import check_files, image_extensions
from visionft.errors import UsageError
from visionft.logs import printable

log = logging.getLogger(__name__)
POLICIES = ("skip", "error")


class BadImages(UsageError):
    def __init__(self, message: str, rejected: dict[str, str]) -> None:
        super().__init__(message)
        self.rejected = rejected


class ImageFolderDataModule(ClassificationDataModule):
    def __init__(self, root: str | None = None, on_bad_image: str = "skip", cache_dir: str | None = None,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        if on_bad_image not in POLICIES:
            raise UsageError(f"data.on_bad_image={on_bad_image!r} is not a policy; valid: {', '.join(POLICIES)}")
        self.root, self.on_bad_image, self.cache_dir = root, on_bad_image, cache_dir
        self.rejected: dict[str, str] = {}

    def files_root(self) -> str | None:
        return str(Path(self.root).expanduser()) if self.root else None

    def _scan(self, folder: Path, classes: list[str]) -> dict[str, dict[str, str]]:
        """class -> {image file under ``folder/<class>/``: its real path}."""
        ext = image_extensions()
        return {c: folders.walk_images(folder / c, ext) if (folder / c).is_dir() else {} for c in classes}

    def load_splits(self):
        if not self.root:
            raise FileNotFoundError("data.root is not set: pass data.root=/path/to/images (ImageFolder layout)")
        root = Path(self.root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"data.root={str(root)!r} does not exist: point data.root at an image folder")
        layout = folders.find_splits(root)
        self.source_names = folders.split_names(layout, root)
        classes = folders.class_folders(layout["train"])
        folders.at_least_two(root, layout["train"], classes)  # before any image is read
        for s, folder in layout.items():
            if s != "train":
                folders.unknown_classes(folder, classes, image_extensions())
        scans = folders.count_once({s: self._scan(f, classes) for s, f in layout.items()}, layout)
        self._check(scans)
        kept = [c for c in classes if scans["train"][c]]
        orphans = {s: [c for c in classes if c not in kept and files[c]] for s, files in scans.items() if s != "train"}
        if any(orphans.values()):
            named = "; ".join(f"{layout[s].name}/: {', '.join(map(repr, cs))}" for s, cs in orphans.items() if cs)
            raise UsageError(f"class folder(s) with images to evaluate but no usable training image ({named}): "
                             f"add training images to train/<class>/, or remove the class from every split")
        for c in sorted(set(classes) - set(kept)):
            log.warning("class folder %r has no usable image: ignored", c)
        if not kept:
            raise FileNotFoundError(f"no usable images found under {layout['train']} (expected "
                                    f"{layout['train']}/<class>/<image>)")
        folders.at_least_two(root, layout["train"], kept, [c for c in classes if c not in kept])
        splits = {s: self._split(files, kept) for s, files in scans.items()}
        for s in ("val", "test"):
            if s in splits and not len(splits[s]):
                log.warning("%s/ holds no usable image of the training classes: carving %s from train instead",
                            layout[s], s)
                splits[s] = None
        return splits["train"], splits.get("val"), splits.get("test"), kept

    def _check(self, scans: dict[str, dict[str, list[str]]]) -> None:
        paths = [p for files in scans.values() for ps in files.values() for p in ps]
        self.rejected = check_files(paths, self.cache_dir)
        if not self.rejected:
            return
        if self.on_bad_image == "error":
            first = "; ".join(f"{printable(p)}: {printable(r)}" for p, r in list(self.rejected.items())[:3])
            raise BadImages(f"{len(self.rejected)} unusable image file(s) under {self.root} ({first}"
                            f"{'; ...' if len(self.rejected) > 3 else ''}): fix or remove them, or pass "
                            f"data.on_bad_image=skip to train without them", self.rejected)
        log.warning("%d unusable image file(s) skipped (data.on_bad_image=skip; listed in bad_images.csv)",
                    len(self.rejected))
        for files in scans.values():
            for c, ps in files.items():
                files[c] = [p for p in ps if p not in self.rejected]

    @staticmethod
    def _split(files: dict[str, list[str]], classes: list[str]) -> Split:
        pairs = [(p, i) for i, c in enumerate(classes) for p in files.get(c, [])]
        return Split([p for p, _ in pairs], np.asarray([i for _, i in pairs], dtype=np.int64))
