"""A folder of images: ``root/{train,val,test}/<class>/*`` or one ``root/<class>/*`` split by seeded fractions."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from datamodules.base import ClassificationDataModule, Split


def read_rgb(path: str) -> np.ndarray:
    """Read any image PIL reads as an RGB uint8 array, EXIF orientation applied."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise RuntimeError(f"cannot read image {path!r} ({e}); remove or replace the file and run again") from None


class ImageFolderDataModule(ClassificationDataModule):
    def __init__(self, root: str | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.root = root

    def _scan(self, folder: Path, classes: list[str] | None = None) -> tuple[Split, list[str]]:
        from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

        if classes is None:
            classes, _ = find_classes(str(folder))
        samples = make_dataset(str(folder), {c: i for i, c in enumerate(classes)}, extensions=IMG_EXTENSIONS,
                               allow_empty=True)
        if not samples:
            raise FileNotFoundError(f"no images found under {folder} (expected {folder}/<class>/<image>)")
        paths, labels = zip(*samples)
        return Split(list(paths), np.asarray(labels, dtype=np.int64)), classes

    def load_splits(self):
        if not self.root:
            raise FileNotFoundError("data.root is not set: pass data.root=/path/to/images (ImageFolder layout)")
        root = Path(self.root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"data.root={str(root)!r} does not exist: point data.root at an image folder")
        if not (root / "train").is_dir():
            split, classes = self._scan(root)
            return split, None, None, classes
        train, classes = self._scan(root / "train")
        val = self._scan(root / "val", classes)[0] if (root / "val").is_dir() else None
        test = self._scan(root / "test", classes)[0] if (root / "test").is_dir() else None
        return train, val, test, classes
