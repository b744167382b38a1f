import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import DigitsDataModule, ImageFolderDataModule, SyntheticDataModule
from datamodules.cifar import CIFAR10DataModule


def _check_loader(dm, size):
    dm.configure(size)
    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.uint8 and x.shape[1:] == (3, size, size)
    assert y.dtype == torch.int64 and x.shape[0] == y.shape[0] == dm.batch_size
    xv, _ = next(iter(dm.val_dataloader()))
    assert xv.shape[1:] == (3, size, size)


def test_digits_splits_are_stratified_and_seeded():
    dm = DigitsDataModule(seed=3, test_fraction=0.2, val_fraction=0.1)
    sizes = dm.sizes()
    assert sizes == {"train": 1293, "val": 144, "test": 360}
    test_counts = np.bincount(dm.splits["test"].labels)
    assert test_counts.min() >= 35 and test_counts.max() <= 37  # stratified: 36 +- 1 per class
    again = DigitsDataModule(seed=3)
    again.setup()
    assert np.array_equal(again.splits["test"].images, dm.splits["test"].images)
    assert sum(sizes.values()) == 1797
    other = DigitsDataModule(seed=4)
    other.setup()
    assert not np.array_equal(other.splits["test"].labels, dm.splits["test"].labels)
    assert dm.splits["train"].images.shape[1:] == (8, 8, 3) and dm.splits["train"].images.max() == 255
    _check_loader(dm, 64)


@pytest.mark.parametrize("per_class", [1, 5, 20])
def test_per_class_subsets_exact_counts(per_class):
    dm = SyntheticDataModule(per_class=per_class, train_size=400, seed=0)
    dm.setup()
    assert np.bincount(dm.splits["train"].labels).tolist() == [per_class] * 10
    other = SyntheticDataModule(per_class=per_class, train_size=400, seed=1)
    other.setup()
    assert not np.array_equal(other.splits["train"].images, dm.splits["train"].images)  # seeded


def test_synthetic_shapes_and_test_split():
    dm = SyntheticDataModule(num_classes=4, train_size=100, test_size=20, batch_size=8)
    assert dm.sizes() == {"train": 90, "val": 10, "test": 20} and dm.num_classes == 4
    _check_loader(dm, 32)


def _write_folder(root, classes=("cat", "dog"), n=6):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((20, 24, 3), (25 * i) % 256, np.uint8)).save(root / c / f"{i}.png")


def test_imagefolder_with_split_folders(tmp_path):
    for split in ("train", "val", "test"):
        _write_folder(tmp_path / split)
    dm = ImageFolderDataModule(root=str(tmp_path), batch_size=4)
    assert dm.sizes() == {"train": 12, "val": 12, "test": 12} and dm.classes == ["cat", "dog"]
    _check_loader(dm, 16)


def test_imagefolder_single_folder_is_split_by_fractions(tmp_path):
    _write_folder(tmp_path, n=10)
    dm = ImageFolderDataModule(root=str(tmp_path), batch_size=4, test_fraction=0.2, val_fraction=0.25)
    assert dm.sizes() == {"train": 12, "val": 4, "test": 4}


def test_imagefolder_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.root"):
        ImageFolderDataModule(root=str(tmp_path / "missing")).setup()
    _write_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "cat" / "broken.jpg").write_bytes(b"not an image")
    dm = ImageFolderDataModule(root=str(tmp_path / "imgs"), batch_size=100, test_fraction=0.3, val_fraction=0.3)
    dm.setup()  # a broken file is checked before training: skipped with its reason (on_bad_image=skip)
    broken = str(tmp_path / "imgs" / "cat" / "broken.jpg")
    assert "not an image" in dm.rejected[broken] and all(broken not in s.images for s in dm.splits.values())
    with pytest.raises(ValueError, match="broken.jpg"):
        ImageFolderDataModule(root=str(tmp_path / "imgs"), on_bad_image="error").setup()


def test_cifar_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.download=true"):
        CIFAR10DataModule(root=str(tmp_path)).setup()
