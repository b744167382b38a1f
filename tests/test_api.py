"""The Python API as a notebook user would call it: compose, fit, metrics, run directory, model, load, predict."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY
from hydra.utils import instantiate

import visionft


def test_fit_load_and_predict_reproduce_the_runs_evaluation(tmp_path):
    cfg = visionft.compose([*TINY, "data.num_classes=4", "trainer.max_epochs=2"])
    run = visionft.fit(cfg, output_dir=tmp_path / "run")
    assert run.dir == tmp_path / "run"
    assert run.metrics["test"] == json.loads((run.dir / "metrics.json").read_text())["test"]
    assert isinstance(run.model, torch.nn.Module) and not run.model.training
    trained = visionft.load(run.dir)
    assert trained.classes == [f"class_{i}" for i in range(4)]
    dm = instantiate(cfg.data)  # the run's own test split: raw uint8 images and their labels
    dm.setup()
    images, labels = dm.splits["test"].images, dm.splits["test"].labels
    rows = trained.predict(list(images), topk=1)
    hits = [r["label_1"] == trained.classes[y] for r, y in zip(rows, labels)]
    assert sum(hits) / len(hits) == pytest.approx(run.metrics["test"]["test/acc"], abs=1e-6)
    same = visionft.load(run.metrics["best_checkpoint"])  # a .ckpt path works too
    assert same.predict(list(images[:4]), topk=1) == rows[:4]


def test_fit_takes_overrides_and_the_config_dir_of_a_user(tmp_path):
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "tiny.yaml").write_text(
        "# @package _global_\ntrainer:\n  max_epochs: 1\nstrategy:\n  lr: 0.002\n")
    cfg = visionft.compose([*TINY, "experiment=tiny"], config_dir=tmp_path / "conf")
    assert cfg.strategy.lr == 0.002
    run = visionft.fit([*TINY, "strategy=partial"], output_dir=tmp_path / "partial")
    assert run.metrics["strategy"] == "Partial" and run.metrics["epochs"] == 1


def test_load_without_checkpoints_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoints/final.ckpt, best.ckpt"):
        visionft.load(tmp_path)


@pytest.mark.slow
def test_the_readme_example_runs(tmp_path, monkeypatch):
    """The README's Python API block, as written (real EfficientNet-Lite0 weights, digits, 2 epochs)."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = readme.split("## Python API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["run"].metrics["test"]["test/acc"] > 0.5 and (tmp_path / "outputs" / "api-demo").is_dir()


def test_fit_leaves_the_callers_config_alone_and_arrays_must_be_uint8(tmp_path, monkeypatch):
    import numpy as np

    monkeypatch.chdir(tmp_path)
    cfg = visionft.compose([*TINY, "trainer.max_epochs=1", "data.num_classes=2"])
    first, second = visionft.fit(cfg), visionft.fit(cfg)
    assert cfg.paths.output_dir is None and first.dir != second.dir and (first.dir / "metrics.json").is_file()
    with pytest.raises(ValueError, match="RGB uint8"):
        first.trained.predict([np.zeros((8, 8, 3), np.float32)])
