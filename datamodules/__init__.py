"""Classification datamodules for visionft.

Every datamodule yields ``(uint8 CHW tensor, label)``; normalization happens on the accelerator inside the
LightningModule (mean/std from the backbone's timm data config), so batches cross to the device as uint8.
"""
from datamodules.base import ClassificationDataModule, Split
from datamodules.cifar import CIFAR10DataModule, CIFAR100DataModule
from datamodules.digits import DigitsDataModule
from datamodules.imagefolder import ImageFolderDataModule
from datamodules.synthetic import SyntheticDataModule

__all__ = [
    "ClassificationDataModule",
    "Split",
    "DigitsDataModule",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "ImageFolderDataModule",
    "SyntheticDataModule",
]
