"""A resume checks more than the config keys: the strategy has training to continue, the data is the data the
checkpoint was trained on, and what a resume cannot change is recorded as the checkpoint's (what ran)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY
from omegaconf import OmegaConf

from visionft.checkpoints import config_changes
from visionft.errors import UsageError
from visionft.resume import with_run_overrides
from visionft.train import train

FOLDER = ["data=imagefolder", "backbone.name=test_resnet", "backbone.pretrained=false", "data.image_size=32",
          "data.batch_size=16", "data.num_workers=0", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
          "trainer.accelerator=cpu", "trainer.devices=1"]


def _files(run: Path) -> dict[str, bytes]:
    """Every file of a run folder but its lock and log, by relative path."""
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name not in (".lock", "__main__.log")}


def _run(compose, overrides: list[str], out: Path) -> dict:
    return train(compose(overrides, out), overrides=[*overrides, f"paths.output_dir={out}"])


def _compose(overrides, out):
    from conftest import compose_cfg

    return compose_cfg(overrides, out)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished tiny run (1 epoch) and its metrics; each test resumes a copy of its folder."""
    out = tmp_path_factory.mktemp("trained") / "run"
    return out, _run(_compose, TINY, out)


def _copy(trained, tmp_path) -> Path:
    shutil.copytree(trained[0], tmp_path / "run", ignore=shutil.ignore_patterns(".lock"))
    return tmp_path / "run"


def test_a_closed_form_strategy_over_a_trained_run_is_refused_and_leaves_the_run_as_it_was(trained, tmp_path):
    out = _copy(trained, tmp_path)
    before = _files(out)
    assert "README.md" in before and any(k.startswith("report/") for k in before)
    with pytest.raises(UsageError, match="has no training to resume") as e:
        _run(_compose, [*TINY, "strategy=linear_probe", "resume=true"], out)
    assert "resume=true paths.output_dir=" in str(e.value)  # how to resume it as it was
    assert _files(out) == before  # metrics, card, report, overrides and checkpoints untouched, no final.ckpt added


def _image_folder(root: Path, per_class: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    from PIL import Image

    for split, n in per_class.items():
        for c, colour in (("red", (200, 30, 30)), ("green", (30, 200, 30)), ("blue", (30, 30, 200))):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.clip(np.asarray(colour) + rng.normal(0, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i:03d}.png")


def test_b_a_resume_over_swapped_images_is_refused_naming_the_split_and_the_new_files(tmp_path):
    data, out = tmp_path / "data", tmp_path / "run"
    _image_folder(data, {"train": 12, "val": 4, "test": 4})
    args = [*FOLDER, f"data.root={data}"]
    _run(_compose, args, out)
    gone = sorted((data / "train").rglob("*.png"))[:20]  # 20 of the 36 training images swapped for others
    new = []
    for p in gone:
        target = p.with_name("new_" + p.name)
        p.rename(target)
        new.append(target.relative_to(data).as_posix())
    with pytest.raises(UsageError, match="the data changed") as e:
        _run(_compose, [*args, "resume=true"], out)
    said = str(e.value)
    assert "train: 36 -> 36 images, 20 gone and 20 new (new: " in said, said
    named = said.split("(new: ", 1)[1].split(")", 1)[0].split(", ")
    assert [n for n in named if n != "..."] and all(n in new for n in named if n != "...")
    assert "val:" not in said and "test:" not in said  # those splits are as they were
    changes = _run(_compose, [*args, "resume=true", "resume_changes=allow"], out)["resumed"]["changes"]
    assert len(changes) == 1 and changes[0].startswith("data: train: 36 -> 36 images, 20 gone and 20 new (new: ")


def test_b_a_checkpoint_without_a_data_fingerprint_still_resumes(trained, tmp_path):
    out = _copy(trained, tmp_path)
    last = out / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert set(ckpt["visionft_data"]["splits"]) == {"train", "val", "test"}
    del ckpt["visionft_data"]  # as an earlier visionft saved it
    torch.save(ckpt, last)
    resumed = _run(_compose, [*TINY, "data.train_size=176", "resume=true", "resume_changes=allow"], out)["resumed"]
    assert resumed["changes"] == ["data.train_size: 160 -> 176"]  # the config says so; the data is not compared


def test_b_in_memory_data_fingerprints_follow_the_pixels_and_labels():
    from datamodules import DigitsDataModule

    a, b = DigitsDataModule(seed=0), DigitsDataModule(seed=0)
    assert a.changed_since(b.fingerprint()) == []
    b.setup()
    b.splits["train"].images[3] = 255 - b.splits["train"].images[3]  # one training image altered
    said = a.changed_since(b.fingerprint())
    n = len(a.splits["train"])
    assert said == [f"train: {n} -> {n} images, 1 gone and 1 new"]


def test_c_changes_a_resume_cannot_apply_are_recorded_as_the_checkpoints(trained, tmp_path):
    out, first = _copy(trained, tmp_path), trained[1]
    asked = [*TINY, "strategy.lr=1e-2", "optimizer.weight_decay=0.2",
             "scheduler.min_lr_ratio=0.5", "resume=true", "resume_changes=allow"]
    m = _run(_compose, asked, out)
    ran = {g["group"]: (g["base_lr"], g["weight_decay"]) for g in m["param_groups"]}
    assert ran == {g["group"]: (g["base_lr"], g["weight_decay"]) for g in first["param_groups"]}  # the optimizer's own
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["strategy"]["lr"] == ran["head"][0] == 5e-4 and cfg["optimizer"]["weight_decay"] == 0.05
    assert cfg["scheduler"]["min_lr_ratio"] == 0.5  # the schedule's shape does apply
    recorded = yaml.safe_load((out / "overrides.yaml").read_text())
    assert "strategy.lr=1e-2" not in recorded and "strategy.lr=0.0005" in recorded
    card = (out / "README.md").read_text()
    reproduce = card.split("## Reproduce", 1)[1].split("```")[1]
    assert "strategy.lr=0.0005" in reproduce and "weight_decay=0.05" in reproduce and "1e-2" not in reproduce
    assert m["resumed"]["step"] == 9  # the end of epoch 1: 144 training images (160 less 10% for val) / 16 a batch
    assert m["resumed"]["changes"] == ["scheduler.min_lr_ratio: 0.01 -> 0.5"]
    assert m["resumed"]["not_applied"] == ["optimizer.weight_decay: 0.05 -> 0.2", "strategy.lr: 0.0005 -> 0.01"]
    assert m["resumed"]["epoch"] == first["chosen"]["epoch"]  # Lightning's epoch of the end-of-epoch checkpoint
    assert (f"- resumed: from `last.ckpt` at epoch {first['chosen']['epoch']}, step 9; changed on resume: "
            f"scheduler.min_lr_ratio: 0.01 -> 0.5; not applied") in card
    own = with_run_overrides(["resume=true", f"paths.output_dir={out}"])  # the folder's recorded command line
    stored = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]
    again = config_changes(stored, OmegaConf.to_container(_compose(own, None), resolve=True))
    assert again == ["scheduler.min_lr_ratio: 0.01 -> 0.5"]  # no step ran: last.ckpt is the first run's, as said


def test_c_another_optimizer_on_resume_is_one_line(trained, tmp_path):
    out = _copy(trained, tmp_path)
    with pytest.raises(UsageError, match=r"another optimizer \(optimizer._target_: 'torch.optim.AdamW' -> "):
        _run(_compose, [*TINY, "optimizer=sgd", "trainer.max_epochs=2", "resume=true", "resume_changes=allow"], out)


@pytest.mark.parametrize("value", ["/runs/a b/c", "C:\\data\\x", "it's", 'say "hi"', "plain", None, 1e-4, True,
                                   [1, "a b"]])
def test_a_kept_value_is_written_as_hydra_reads_it_back(value):
    """The value a resume pins into overrides.yaml parses back, by Hydra's own override parser, to the same value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from visionft.resumecheck import hydra_value

    assert OverridesParser.create().parse_override(f"k={hydra_value(value)}").value() == value
