"""CIFAR-10/100 through torchvision (``data.root``, ``data.download``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from datamodules.base import ClassificationDataModule, Split


class _TorchvisionCIFAR(ClassificationDataModule):
    dataset_name = ""

    def __init__(self, root: str = "data", download: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.root, self.download = str(Path(root).expanduser()), download

    def _dataset(self, train: bool):
        import torchvision.datasets as tvd

        cls = getattr(tvd, self.dataset_name)
        try:
            return cls(self.root, train=train, download=self.download)
        except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
            raise FileNotFoundError(
                f"{self.dataset_name} not found under data.root={self.root!r} ({e}). Fix: set data.download=true "
                f"(needs network), or point data.root at a folder holding the extracted dataset, or use "
                f"data=imagefolder for a folder of images."
            ) from None
        except OSError as e:  # download attempted without network
            raise FileNotFoundError(
                f"could not download {self.dataset_name} into {self.root!r}: {e}. Fix: download it where there is "
                f"network and set data.root, or use data=imagefolder."
            ) from None

    def prepare_data(self) -> None:
        if self.download:
            self._dataset(True), self._dataset(False)

    def load_splits(self):
        train, test = self._dataset(True), self._dataset(False)
        as_split = lambda d: Split(np.asarray(d.data), np.asarray(d.targets, dtype=np.int64))  # noqa: E731
        return as_split(train), None, as_split(test), list(train.classes)


class CIFAR10DataModule(_TorchvisionCIFAR):
    dataset_name = "CIFAR10"


class CIFAR100DataModule(_TorchvisionCIFAR):
    dataset_name = "CIFAR100"
