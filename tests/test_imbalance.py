"""Class imbalance: a run on a heavily imbalanced training split warns once as it starts, with the per-class counts
(the files on disk), and points at loss.class_weights=balanced and data.sampler=balanced; metrics.json and the model
card carry the counts. data.sampler=balanced draws every class about equally often, on both data paths, and a run
killed mid-epoch and resumed sees the same batches as an uninterrupted one."""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import TINY, compose_cfg
from PIL import Image
from resume_helpers import last_weights, records, run_recorded

IMBALANCED = {"train": {"a": 60, "b": 4}, "val": {"a": 4, "b": 4}, "test": {"a": 4, "b": 4}}
BALANCED = {"train": {"a": 32, "b": 32}, "val": {"a": 4, "b": 4}, "test": {"a": 4, "b": 4}}
FOLDER = [o for o in TINY if not o.startswith(("data=", "data.train_size", "data.test_size"))] + [
    "data=imagefolder", "data.num_workers=0", "data.image_size=32", "logger=none", "callbacks.lr_monitor=null"]


def _folder(root: Path, counts: dict[str, dict[str, int]]) -> Path:
    """root/<split>/<class>/<i>.png, each image a noisy tint of its class colour."""
    rng = np.random.default_rng(0)
    for split, per_class in counts.items():
        for k, (c, n) in enumerate(per_class.items()):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                img = np.array([200, 60, 60]) if k == 0 else np.array([60, 60, 200])
                img = img + rng.normal(0, 25, (20, 24, 3))
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / split / c / f"{i}.png")
    return root


def _on_disk(root: Path) -> dict[str, int]:
    return {c.name: len(list(c.glob("*.png"))) for c in sorted((root / "train").iterdir())}


def _train(root: Path, out: Path, caplog, *extra: str) -> tuple[dict, list[str]]:
    from visionft.train import train

    with caplog.at_level(logging.WARNING, logger="visionft"):
        train(compose_cfg([*FOLDER, f"data.root={root}", *extra], out))
    warned = [r.getMessage() for r in caplog.records if "class imbalance" in r.getMessage()]
    return json.loads((out / "metrics.json").read_text()), warned


def test_an_imbalanced_training_split_warns_once_with_its_counts_and_the_card_shows_them(tmp_path, caplog):
    root = _folder(tmp_path / "data", IMBALANCED)
    disk = _on_disk(root)
    assert disk == {"a": 60, "b": 4}
    metrics, warned = _train(root, tmp_path / "run", caplog)
    expected = (f"class imbalance in train: most 'a' {disk['a']}, fewest 'b' {disk['b']} ({disk['a'] // disk['b']}x); "
                f"the model may never predict the small classes: set loss.class_weights=balanced or "
                f"data.sampler=balanced")
    assert warned == [expected]  # once, as the run starts
    assert metrics["class_counts"]["train"] == disk
    assert expected in metrics["warnings"]
    card = (tmp_path / "run" / "README.md").read_text()
    assert f"> **WARNING: {expected}**" in card
    assert f"- training images per class: a {disk['a']}, b {disk['b']}" in card.split("## Data")[1]


@pytest.mark.parametrize("counts, extra", [
    (BALANCED, ()),
    (IMBALANCED, ("loss.class_weights=balanced",)),
    (IMBALANCED, ("data.sampler=balanced",)),
], ids=["balanced-folder", "class-weights", "balanced-sampler"])
def test_no_warning_when_balanced_or_already_weighted_and_the_counts_are_recorded(tmp_path, caplog, counts, extra):
    root = _folder(tmp_path / "data", counts)
    metrics, warned = _train(root, tmp_path / "run", caplog, *extra)
    assert warned == []
    assert metrics["class_counts"]["train"] == _on_disk(root)
    assert not any("class imbalance" in w for w in metrics.get("warnings", []))


def test_the_threshold_is_ten_to_one_and_a_closed_form_probe_is_pointed_at_class_weights_only():
    from visionft.imbalance import warning

    def run(a: int, b: int, gradient_fit=True, class_weights=None, sampler=None):
        dm = SimpleNamespace(classes=["a", "b"], class_counts=lambda: np.array([a, b]), sampler=sampler)
        module = SimpleNamespace(options=SimpleNamespace(class_weights=class_weights),
                                 strategy=SimpleNamespace(gradient_fit=gradient_fit))
        return warning(dm, module)

    assert run(39, 4) is None and run(40, 4).endswith("(10x); the model may never predict the small classes: set "
                                                      "loss.class_weights=balanced or data.sampler=balanced")
    assert run(4, 40).startswith("class imbalance in train: most 'b' 40, fewest 'a' 4 (10x)")
    probe = run(200, 5, gradient_fit=False, sampler="balanced")  # the probe's head sees no sampler
    assert probe.endswith("(40x); the model may never predict the small classes: set loss.class_weights=balanced")
    assert run(200, 5, class_weights=[1.0, 40.0]) is None and run(200, 5, sampler="balanced") is None


@pytest.mark.parametrize("resident", ["false", "true"])
def test_the_balanced_sampler_draws_each_class_about_equally(tmp_path, resident):
    """64 images, 4 of them 'b' (6%): over 10 epochs of 64 draws each class is drawn 40-60% of the time (0.5 +- 5
    binomial standard deviations); without the sampler each epoch holds every image once."""
    from datamodules import ImageFolderDataModule

    root = _folder(tmp_path / "data", IMBALANCED)
    disk = _on_disk(root)

    def labels_over(epochs: int, sampler):
        dm = ImageFolderDataModule(root=str(root), sampler=sampler, batch_size=16, num_workers=0, image_size=32,
                                   resident=resident, seed=0, augment={"name": "crop_flip"})
        dm.configure(32)
        dm.trainer = SimpleNamespace(current_epoch=0, world_size=1, strategy=SimpleNamespace(root_device="cpu"))
        loader, seen = dm.train_dataloader(), []
        for epoch in range(epochs):
            dm.trainer.current_epoch = epoch
            seen += [int(y) for _, ys in loader for y in ys]
        return Counter(dm.classes[y] for y in seen), loader

    plain, _ = labels_over(1, None)
    assert plain == disk  # 64 images, batch 16: every image once
    drawn, loader = labels_over(10, "balanced")
    total = sum(drawn.values())
    assert total == 10 * sum(disk.values())
    assert all(0.4 <= drawn[c] / total <= 0.6 for c in disk), drawn
    if resident == "false":  # an image drawn twice in an epoch is augmented twice, differently
        keys = list(loader.order)
        twice = next(i for i, n in Counter(i for _, i, _ in keys).items() if n > 1)
        (e0, _, k0), (e1, _, k1) = [key for key in keys if key[1] == twice][:2]
        first, second = loader.dataset[(e0, twice, k0)][0], loader.dataset[(e1, twice, k1)][0]
        assert not torch.equal(first, second)


RESUME = [*FOLDER, "data.augment.name=crop_flip", "+trainer.val_check_interval=0.5", "trainer.max_epochs=3",
          "deterministic=true", "data.sampler=balanced"]
STEPS_PER_EPOCH = 4  # 64 training images, batch 16


def _cli(root: Path, out: Path, record: Path, *extra: str):
    return run_recorded([*RESUME, f"data.root={root}"], out, record, *extra)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["data.resident=false", "data.resident=true"])
def test_a_balanced_sampler_run_killed_and_resumed_sees_the_batches_of_an_uninterrupted_run(tmp_path, path):
    root = _folder(tmp_path / "data", IMBALANCED)
    done = _cli(root, tmp_path / "reference", tmp_path / "reference.txt", path)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = records(tmp_path / "reference.txt")
    kill = STEPS_PER_EPOCH + 3  # mid-epoch 1, after its mid-epoch validation and checkpoint
    out, crashed, resumed = tmp_path / "run", tmp_path / "crashed.txt", tmp_path / "resumed.txt"
    killed = _cli(root, out, crashed, path, "+callbacks.killer._target_=resume_helpers.Killer",
                  f"+callbacks.killer.step={kill}")
    assert killed.returncode == -9, killed.stderr[-3000:]
    done = _cli(root, out, resumed, path, "resume=true", "+callbacks.killer.step=-1")
    assert done.returncode == 0, done.stderr[-3000:]
    after = records(resumed)
    start = int(after[0][0])
    assert start == STEPS_PER_EPOCH + 2  # resumed mid-epoch, from the checkpoint of epoch 1's mid-epoch validation
    assert [r for r in records(crashed) if int(r[0]) < start] + after == reference
    final, expected = last_weights(out), last_weights(tmp_path / "reference")
    assert all(torch.equal(final[k], v) for k, v in expected.items())
