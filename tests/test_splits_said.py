"""Every number says what it was computed on: which splits were carved and from what (metrics.json, the printed
summary, the model card), no test split at all (data.test_fraction=0), a test split carved from val
(data.test_from=val), and partial evaluations (trainer.limit_test_batches) that say how many images they used and
still cover every class. Checked against the image files on disk and hand counts."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, compose_cfg
from PIL import Image

from datamodules import ImageFolderDataModule
from visionft.errors import UsageError

CLASSES = [f"c{i}" for i in range(10)]


def _folder(root: Path, counts: dict[str, int], classes=CLASSES) -> Path:
    """root/<split>/<class>/<i>.png with counts[split] images per class (each image a distinct flat colour)."""
    for split, n in counts.items():
        for k, c in enumerate(classes):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (25 * k, 7 * i % 256, len(split) * 20)).save(root / split / c / f"{i}.png")
    return root


def _run(root: Path, out: Path, *extra: str) -> dict:
    from visionft.train import train

    tiny = [o for o in TINY if not o.startswith(("data=", "data.train_size", "data.test_size"))]
    return train(compose_cfg([*tiny, "data=imagefolder", f"data.root={root}", "data.num_workers=0",
                              "data.image_size=32", "data.resident=false", *extra], out))


def test_a_test_split_carved_from_train_is_said_in_metrics_summary_and_card(tmp_path, capsys):
    root = _folder(tmp_path / "data", {"train": 10, "val": 2}, CLASSES[:2])  # 20 in train/, 4 in val/, no test/
    m = _run(root, tmp_path / "run")
    on_disk = {s: len(list((root / s).rglob("*.png"))) for s in ("train", "val")}
    carved = round(0.2 * on_disk["train"])  # data.test_fraction=0.2 of train/, stratified: 2 of each class
    assert m["data"] == {"train": on_disk["train"] - carved, "val": on_disk["val"], "test": carved}
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["split_origin"] == {"train": f"train/, less {carved} images carved for test", "val": "val/",
                                     "test": "carved from train/: 20%, stratified, seed 42"}
    assert saved["test"]["test/images"] == carved and saved["val"]["val/images"] == on_disk["val"]
    printed = capsys.readouterr().out
    assert f"on {carved} test images; the split: carved from train/: 20%, stratified, seed 42" in printed
    card = (tmp_path / "run" / "README.md").read_text()
    assert f"  - test: {carved} images (carved from train/: 20%, stratified, seed 42)" in card
    assert f"  - train: {on_disk['train'] - carved} images (train/, less {carved} images carved for test)" in card
    headline = next(line for line in card.splitlines() if line.startswith("Test accuracy"))
    assert f"on {carved} test images; the split: carved from train/" in headline


def test_no_test_split_reports_val_and_says_there_is_no_separate_test_set(tmp_path, capsys):
    from visionft.preflight import check

    assert check(["data=imagefolder", "data.root=x", "data.test_fraction=0"]) is None  # the command line accepts it
    root = _folder(tmp_path / "data", {"train": 6, "val": 3}, CLASSES[:2])
    m = _run(root, tmp_path / "run", "data.test_fraction=0")
    assert m["data"] == {"train": 12, "val": 6, "test": 0} and m["test"] == {}
    assert (m["split_origin"]["test"].startswith("none (data.test_fraction=0)")
            and m["split_origin"]["train"] == "train/")
    printed = capsys.readouterr().out
    assert f"val acc {m['val']['val/acc']:.4f}" in printed and "no separate test set" in printed
    card = (tmp_path / "run" / "README.md").read_text()
    assert (f"No separate test set. Validation accuracy **{m['val']['val/acc']:.4f}**" in card
            and "on 6 val images; the split: val/" in card)
    assert "Test accuracy" not in card and "### Per class (test" not in card


def test_test_from_val_carves_test_from_the_val_folder_only(tmp_path):
    root = _folder(tmp_path / "data", {"train": 4, "val": 5}, CLASSES[:4])
    dm = ImageFolderDataModule(root=str(root), test_from="val", test_fraction=0.4, seed=3)
    dm.setup()
    val_files = {str(p) for p in (root / "val").rglob("*.png")}
    train_files = {str(p) for p in (root / "train").rglob("*.png")}
    test = set(dm.splits["test"].images)
    assert test and test <= val_files and not test & train_files
    assert set(dm.splits["train"].images) == train_files  # train/ keeps every image
    assert set(dm.splits["val"].images) | test == val_files and not set(dm.splits["val"].images) & test
    assert np.bincount(dm.splits["test"].labels).tolist() == [2] * 4  # 40% of 5 per class, stratified
    assert dm.split_origin["test"] == "carved from val/: 40%, stratified, seed 3"
    assert dm.split_origin["val"] == "val/, less 8 images carved for test" and dm.split_origin["train"] == "train/"
    flat = _folder(tmp_path / "flat", {"": 4}, CLASSES[:2])
    with pytest.raises(UsageError, match=r"data.test_from=val .*\(no val/ folder\)"):
        ImageFolderDataModule(root=str(flat), test_from="val").setup()


def test_a_partial_test_says_how_many_images_and_covers_every_class(tmp_path):
    """test/ is read class by class (c0's 10 images, then c1's, ...): 20% of its batches must still hold every
    class in proportion, and metrics.json must count the 20 images it used, not the 100 of the split."""
    root = _folder(tmp_path / "data", {"train": 3, "val": 2, "test": 10})
    m = _run(root, tmp_path / "run", "+data.eval_batch_size=4", "trainer.limit_test_batches=0.2")
    used = int(0.2 * 100 / 4) * 4  # Lightning: int(0.2 x 25 batches) = 5 batches of 4
    labels = np.load(tmp_path / "run" / "predictions" / "test.npz")["labels"]  # what the test loop really saw
    assert np.bincount(labels, minlength=10).tolist() == [2] * 10  # every class, 2 of its 10 each
    assert m["data"]["test"] == 100 and m["test"]["test/images"] == len(labels) == used
    card = (tmp_path / "run" / "README.md").read_text()
    assert f"on {used} of the 100 test images (a partial evaluation: trainer.limit_test_batches=0.2)" in card
    assert m["val"]["val/images"] == 20


@pytest.mark.parametrize("seed", range(5))
def test_every_prefix_of_the_evaluation_order_holds_each_class_in_proportion(seed):
    from datamodules.splits import spread_order

    labels = np.random.default_rng(seed).permutation(np.repeat(np.arange(5), [50, 30, 11, 6, 3]))  # unbalanced
    order = spread_order(labels, seed)
    assert sorted(order.tolist()) == list(range(len(labels)))
    share = np.bincount(labels) / len(labels)
    for k in range(1, len(labels) + 1):
        counts = np.bincount(labels[order[:k]], minlength=5)
        assert np.all(np.abs(counts - k * share) < 1 + 1e-9), (k, counts, k * share)
    assert not np.array_equal(order, spread_order(labels, seed + 1))
