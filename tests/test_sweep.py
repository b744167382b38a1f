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
    metrics = [json.loads((sweep / j / "metrics.json").read_text()) for j in jobs]
    assert [float(r["mean"]) for r in rows] == pytest.approx([m["val"]["val/acc"] for m in metrics])  # monitored
    assert [float(r["test/acc mean"]) for r in rows] == pytest.approx([m["test"]["test/acc"] for m in metrics])
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


@pytest.mark.slow
def test_a_bad_value_fails_its_own_job_and_the_sweep_goes_on(tmp_path):
    """strategy.freeze_depth=9 on a backbone of 6 depth groups: job 1 fails with its one line, jobs 0 and 2 run,
    the command names the failed job and exits 1, and the report lists it with its reason."""
    sweep = tmp_path / "multirun"
    cmd = [sys.executable, "-m", "visionft", "-m", "strategy=partial", "strategy.freeze_depth=0,9,4",
           "data=synthetic", "data.train_size=32", "data.test_size=16", "data.batch_size=16",
           "backbone.name=test_resnet", "backbone.pretrained=false", "trainer.max_epochs=1", "logger=csv",
           "trainer.enable_progress_bar=false", "trainer.accelerator=cpu", f"hydra.sweep.dir={sweep}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 1, r.stderr[-3000:]
    assert sorted(p.parent.name for p in sweep.glob("*/metrics.json")) == ["0", "2"]  # the job after it ran too
    reason = ("strategy.freeze_depth=9 is out of range for this backbone: it has 6 depth groups (stem ... head), so "
              "freeze_depth must be in 0..5")
    assert (sweep / "1" / "error.txt").read_text() == reason + "\n"
    assert reason in (sweep / "1" / "__main__.log").read_text()  # the job's log says why, too
    assert r.stderr.strip().splitlines()[-1].startswith("error: 1 of 3 jobs failed: 1; the others ran")

    report = subprocess.run([sys.executable, "-m", "visionft", "report", str(sweep)],
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr[-2000:]
    runs = list(csv.DictReader(open(sweep / "runs.csv")))
    assert [(x["job"], x["failed"]) for x in runs] == [("0", ""), ("1", reason), ("2", "")]
    assert "3 runs, 1 failed" in report.stdout and f"| 1 | 9 | {reason} |" in report.stdout
