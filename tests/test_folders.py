"""Class folders read exactly: each file on disk once with its folder's label, symlink loops never followed, split
folders under the names users have, unknown or case-clashing class folders refused, tiny classes kept in training."""
import logging
import os

import numpy as np
import pytest
from PIL import Image

from datamodules import ImageFolderDataModule, SyntheticDataModule
from datamodules.splits import Split, stratified_split
from visionft.errors import UsageError


def _images(folder, n, start=0):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        Image.fromarray(np.full((12, 12, 3), (40 * i) % 256, np.uint8)).save(folder / f"{i}.png")


def _on_disk(root):
    """(real path, class folder) of every image file as the disk holds it, walked without following any link."""
    out = {}
    for here, dirs, files in os.walk(root, followlinks=False):
        for f in files:
            p = os.path.join(here, f)
            if f.endswith(".png") and not os.path.islink(p):
                out[os.path.realpath(p)] = os.path.relpath(p, root).split(os.sep)[0]
    return out


def _seen(dm):
    """(real path, label name) of every image the datamodule uses, over all splits."""
    pairs = [(os.path.realpath(p), dm.classes[y]) for s in dm.splits.values() for p, y in zip(s.images, s.labels)]
    return pairs


def test_a_symlink_loop_gives_exactly_the_files_on_disk(tmp_path, caplog):
    for c, n in (("a", 5), ("b", 5), ("c", 5)):
        _images(tmp_path / "data" / c, n)
    os.symlink("..", tmp_path / "data" / "a" / "loop")  # a/loop/a/loop/... and a/loop/b/...: a cycle
    os.symlink("../b", tmp_path / "data" / "c" / "also_b")  # b's files reached a second time, from class c
    os.symlink("0.png", tmp_path / "data" / "c" / "copy.png")  # a file link: the same file twice in one class
    with caplog.at_level(logging.WARNING):
        dm = ImageFolderDataModule(root=str(tmp_path / "data"), batch_size=4)
        dm.setup()
    seen = _seen(dm)
    assert sorted(p for p, _ in seen) == sorted(_on_disk(tmp_path / "data"))  # each file once, none added
    assert dict(seen) == _on_disk(tmp_path / "data")  # labelled by the folder it lies in
    assert sum(dm.sizes().values()) == 15
    assert "symlink loop not followed" in caplog.text and "counted once" in caplog.text


def test_a_file_belongs_to_the_class_folder_that_holds_it_whichever_link_reaches_it_first(tmp_path):
    """b/sub holds the images; b/aa -> sub is walked before it (so b/sub itself is skipped as already walked) and
    a/l -> ../b/sub reaches them from class a: they are b's, once each."""
    _images(tmp_path / "a", 4)
    _images(tmp_path / "b" / "sub", 4, start=10)
    os.symlink("sub", tmp_path / "b" / "aa")
    os.symlink("../b/sub", tmp_path / "a" / "l")
    dm = ImageFolderDataModule(root=str(tmp_path), batch_size=2, test_fraction=0.25, val_fraction=0.34)
    dm.setup()
    assert dict(_seen(dm)) == _on_disk(tmp_path) and len(_seen(dm)) == 8


def test_a_split_folder_linked_into_another_split_is_not_evaluated_twice(tmp_path):
    _images(tmp_path / "train" / "a", 6)
    _images(tmp_path / "train" / "b", 6)
    _images(tmp_path / "test" / "a", 3, start=10)
    os.symlink("../train/b", tmp_path / "test" / "b")  # test/b is train/b: the same files, not test images
    dm = ImageFolderDataModule(root=str(tmp_path), batch_size=4)
    dm.setup()
    test = {os.path.realpath(p) for p in dm.splits["test"].images}
    train = {os.path.realpath(p) for s in ("train", "val") for p in dm.splits[s].images}
    assert not test & train and len(test) == 3 and len(train) == 12


@pytest.mark.parametrize("extra, says", [("Cat", "differ only in case"), ("bird", "'bird'")])
@pytest.mark.parametrize("split", ["val", "test"])
def test_an_unknown_class_folder_in_val_or_test_is_an_error(tmp_path, split, extra, says):
    _images(tmp_path / "train" / "cat", 4)
    for s in ("train", split):
        _images(tmp_path / s / "dog", 4)
    _images(tmp_path / split / extra, 3)  # val/Cat beside train/cat, or a class training never saw
    with pytest.raises(UsageError, match=f"{split}/ has class folder.*{says}.*training classes are: cat, dog"):
        ImageFolderDataModule(root=str(tmp_path)).setup()


def test_class_folders_that_differ_only_in_case_are_an_error(tmp_path):
    _images(tmp_path / "Cat", 4)
    _images(tmp_path / "cat", 4)
    with pytest.raises(UsageError, match="differ only in case.*'Cat' and 'cat'"):
        ImageFolderDataModule(root=str(tmp_path)).setup()


def test_evaluation_images_of_a_class_with_no_training_image_are_an_error(tmp_path):
    _images(tmp_path / "train" / "cat", 4)
    (tmp_path / "train" / "dog").mkdir()
    _images(tmp_path / "val" / "cat", 2)
    _images(tmp_path / "val" / "dog", 2)
    with pytest.raises(UsageError, match="no usable training image.*val/: 'dog'"):
        ImageFolderDataModule(root=str(tmp_path)).setup()


@pytest.mark.parametrize("name", ["valid", "validation"])
def test_valid_and_validation_folders_are_the_validation_split(tmp_path, name, caplog):
    for s, n in (("train", 8), (name, 3), ("test", 2)):
        _images(tmp_path / s / "a", n)
        _images(tmp_path / s / "b", n, start=20)
    with caplog.at_level(logging.INFO):
        dm = ImageFolderDataModule(root=str(tmp_path), batch_size=4)
        assert dm.sizes() == {"train": 16, "val": 6, "test": 4}
    assert all(f"/{name}/" in p for p in dm.splits["val"].images)
    assert f"{name}/ is the val split" in caplog.text
    _images(tmp_path / "val" / "a", 1)
    with pytest.raises(UsageError, match=f"val/ and {name}/"):
        ImageFolderDataModule(root=str(tmp_path)).setup()


@pytest.mark.parametrize("seed", range(10))
def test_one_tiny_class_keeps_stratification_and_its_training_image(tmp_path, seed, caplog):
    """Classes a=20, b=20, c=1: a and b split in proportion, c's one image in training, for every seed."""
    for c, n in (("a", 20), ("b", 20), ("c", 1)):
        _images(tmp_path / c, n)
    with caplog.at_level(logging.WARNING):
        dm = ImageFolderDataModule(root=str(tmp_path), seed=seed, test_fraction=0.2, val_fraction=0.1)
        dm.setup()
    count = {s: np.bincount(dm.splits[s].labels, minlength=3).tolist() for s in dm.splits}
    assert count["train"][2] == 1 and count["val"][2] == count["test"][2] == 0
    assert count["test"][:2] == [4, 4] and count["val"][:2] == [2, 2] and count["train"][:2] == [14, 14]
    assert "'c'" in caplog.text and "single image" in caplog.text


@pytest.mark.parametrize("seed", range(10))
def test_no_class_loses_all_its_training_images(seed):
    """Two images per class, most of them held out: stratification still leaves one of each class in rest."""
    split = Split([f"{i}.png" for i in range(12)], np.repeat(np.arange(6), 2))
    rest, held = stratified_split(split, 0.8, seed)
    assert sorted(set(rest.labels.tolist())) == list(range(6)) and len(rest) + len(held) == 12


def test_splits_without_small_classes_are_unchanged():
    """The common case keeps scikit-learn's stratified split exactly (same images for the same seed)."""
    from sklearn.model_selection import train_test_split

    train, _, _, _ = SyntheticDataModule(num_classes=5, train_size=200, seed=7).load_splits()
    rest, held = stratified_split(train, 0.2, 7)
    want_rest, want_held = train_test_split(np.arange(len(train)), test_size=0.2, random_state=7,
                                            stratify=train.labels)
    assert np.array_equal(held.labels, train.labels[np.sort(want_held)])
    assert np.array_equal(rest.images, train.images[np.sort(want_rest)])
