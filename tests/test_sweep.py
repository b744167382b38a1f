"""A Hydra multirun over freezing depth, collected by `visionft report`."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_freeze_depth_sweep_and_report(tmp_path):
    sweep = tmp_path / "multirun"
    cmd = [sys.executable, "-m", "visionft", "-m", "strategy=partial", "strategy.freeze_depth=0,2,4",
           "data=synthetic", "data.train_size=96", "data.test_size=32", "backbone.name=test_resnet",
           "backbone.pretrained=false", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
           "trainer.accelerator=cpu", f"hydra.sweep.dir={sweep}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = sorted(p.parent.name for p in sweep.glob("*/metrics.json"))
    assert jobs == ["0", "1", "2"]
    trainable = [json.loads((sweep / j / "metrics.json").read_text())["trainable_params"] for j in jobs]
    assert trainable[0] > trainable[1] > trainable[2] > 0  # deeper freezing, fewer trainable parameters

    report = subprocess.run([sys.executable, "-m", "visionft", "report", str(sweep)],
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr[-2000:]
    table = report.stdout
    assert "strategy.freeze_depth" in table and "test/acc" in table
    rows = list(csv.DictReader(open(sweep / "report.csv")))
    assert [r["strategy.freeze_depth"] for r in rows] == ["0", "2", "4"]
    assert [int(r["trainable_params"]) for r in rows] == trainable
    assert [int(r["n"]) for r in rows] == [1, 1, 1]
    accs = [json.loads((sweep / j / "metrics.json").read_text())["test"]["test/acc"] for j in jobs]
    assert [float(r["mean"]) for r in rows] == pytest.approx(accs)
    assert (sweep / "metric.png").stat().st_size > 1000 and (sweep / "report.md").is_file()
    assert all((sweep / j / "README.md").is_file() for j in jobs)  # every job left its own report


@pytest.mark.slow
def test_multirun_with_an_output_dir_gives_each_job_its_folder(tmp_path):
    out = tmp_path / "mine"
    cmd = [sys.executable, "-m", "visionft", "-m", "seed=1,2", "data=synthetic", "data.train_size=48",
           "data.test_size=16", "backbone.name=test_resnet", "backbone.pretrained=false", "trainer.max_epochs=1",
           "trainer.enable_progress_bar=false", "trainer.accelerator=cpu", f"paths.output_dir={out}",
           f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    seeds = [json.loads((out / j / "config.yaml").read_text().split("seed: ")[1].split("\n")[0]) for j in ("0", "1")]
    assert seeds == [1, 2] and all((out / j / "metrics.json").is_file() for j in ("0", "1"))
