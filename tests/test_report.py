"""Every run's report (model card, per-class table, confusion matrix, curves, wrong images) and the sweep report,
checked against things the report code does not compute: the trained model's own predictions on the labelled test
split, torchmetrics' macro-F1 from the test loop, numpy over hand-made sweep results, and a CLI run of the same
overrides."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import TINY
from hydra.utils import instantiate
from PIL import Image

import visionft

RUN = [*TINY, "data.num_classes=4", "data.train_size=96", "data.test_size=48", "trainer.max_epochs=2"]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "visionft", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def gradual_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "run"
    return visionft.fit([*RUN, "strategy=gradual_unfreeze", "trainer.max_epochs=3"], output_dir=out)


def test_per_class_table_and_confusion_match_the_trained_models_own_predictions(gradual_run):
    run = gradual_run
    trained = visionft.load(run.dir)
    dm = instantiate(visionft.compose(RUN).data)
    dm.setup()
    images, labels = dm.splits["test"].images, dm.splits["test"].labels
    guess = np.array([trained.classes.index(r["label_1"]) for r in trained.predict(list(images), topk=1)])
    table = pd.read_csv(run.dir / "report" / "per_class.csv")
    assert list(table["class"]) == trained.classes
    for c in range(4):  # precision, recall and support by hand, from the deployable model's predictions
        tp = np.sum((guess == c) & (labels == c))
        assert table["support"][c] == np.sum(labels == c)
        assert table["recall"][c] == pytest.approx(tp / max(np.sum(labels == c), 1), abs=1e-4)
        assert table["precision"][c] == pytest.approx(tp / max(np.sum(guess == c), 1), abs=1e-4)
    # the test loop's torchmetrics macro-F1 (computed during evaluation, not from the saved predictions)
    assert table["f1"].mean() == pytest.approx(run.metrics["test"]["test/f1_macro"], abs=1e-4)
    card = (run.dir / "README.md").read_text()
    assert f"{run.metrics['test']['test/acc']:.4f}" in card and "| class_3 |" in card
    pred = np.load(run.dir / "predictions" / "test.npz")
    wrong = pred["wrong_index"]
    assert len(wrong) == min(25, int(np.sum(guess != labels)))
    assert np.all(guess[wrong] != labels[wrong])
    conf = pred["probs"][wrong].max(1)
    assert np.all(np.diff(conf) <= 1e-7)  # most confident first
    assert Image.open(run.dir / "report" / "confusion.png").size[0] > 300
    assert Image.open(run.dir / "report" / "wrong.png").size[0] > 300


def test_curves_mark_where_groups_open_and_the_card_says_what_trained(gradual_run):
    run = gradual_run
    m = run.metrics
    assert m["opens"]["head"] == 0 and sorted(e for e in m["opens"].values() if e is not None)[:3] == [0, 1, 2]
    card = (run.dir / "README.md").read_text()
    opened = re.search(r"Groups opened after the start: (.*)", card).group(1)
    assert opened.count("at epoch") == 2 and "at epoch 1" in opened and "at epoch 2" in opened  # 3 epochs: 2 opens
    assert "![curves](report/curves.png)" in card
    # the param-group table: what the optimizer held at the end (trainable yes/no per group)
    rows = {r["group"]: r for r in m["param_groups"]}
    assert rows["head"]["trainable"] and not rows[min(m["opens"], key=lambda g: -(m["opens"][g] or 0))]["trainable"]
    curves = pd.read_csv(run.dir / "csv" / "metrics.csv")
    assert curves.filter(like="lr-").notna().any().any()  # the LR curves the figure draws were logged
    assert Image.open(run.dir / "report" / "curves.png").size[0] > 800


def test_report_rebuilds_from_the_files_alone(gradual_run, tmp_path):
    import shutil

    run_dir = shutil.copytree(gradual_run.dir, tmp_path / "copy")  # the fixture's run stays as it was
    def same(text: str) -> str:  # the copy's path or the original's: the same run
        return text.replace(str(run_dir), "RUN").replace(str(gradual_run.dir), "RUN")

    card = same((run_dir / "README.md").read_text())
    per_class = (run_dir / "report" / "per_class.csv").read_text()
    shutil.rmtree(run_dir / "report")
    (run_dir / "README.md").unlink()
    r = cli("report", str(run_dir), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert same((run_dir / "README.md").read_text()) == card
    assert (run_dir / "report" / "per_class.csv").read_text() == per_class
    assert {p.name for p in (run_dir / "report").iterdir()} == {"per_class.csv", "confusion.png", "curves.png",
                                                               "wrong.png"}


def test_class_names_with_markdown_and_tex_characters_are_drawn_and_tabled_as_written(tmp_path):
    from visionft.report import run as report_run

    classes = ["a|b", "price_$5", "price_$10", "line\nbreak"]
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 5)
    probs = rng.dirichlet(np.ones(4), 20).astype(np.float32)
    wrong = np.flatnonzero(probs.argmax(1) != labels)[:5]
    (tmp_path / "predictions").mkdir()
    np.savez(tmp_path / "predictions" / "test.npz", probs=probs, labels=labels, classes=np.asarray(classes),
             wrong_index=wrong, wrong_images=np.zeros((len(wrong), 8, 8, 3), np.uint8),
             wrong_paths=np.asarray([""] * len(wrong)))
    (tmp_path / "metrics.json").write_text(json.dumps({"strategy": "Full", "backbone": "b", "val": {}, "test": {},
                                                       "data": {"test": 20}}))
    (tmp_path / "overrides.yaml").write_text("- resume=true\n- seed=1\n")
    report_run.write(tmp_path)
    card = (tmp_path / "README.md").read_text()
    rows = [ln for ln in card.splitlines() if ln.startswith("| a") or ln.startswith("| price")]
    assert len(rows) == 3 and all(ln.replace("\\|", "").count("|") == 6 for ln in rows)  # 5 columns each
    assert "python -m visionft seed=1\n" in card  # the run's command, not its resume
    assert Image.open(tmp_path / "report" / "wrong.png").size[0] > 100


def test_a_report_failure_never_costs_the_trained_run(tmp_path, monkeypatch):
    import visionft.train

    def broken(*a, **k):
        raise OSError("disk trouble while saving predictions")

    monkeypatch.setattr(visionft.train, "save_predictions", broken)
    run = visionft.fit([*RUN, "trainer.max_epochs=1"], output_dir=tmp_path / "r")
    saved = json.loads((run.dir / "metrics.json").read_text())
    assert saved["test"]["test/acc"] == run.metrics["test"]["test/acc"] and "disk trouble" in saved["report_error"]
    assert (run.dir / "README.md").is_file() and not (run.dir / "report" / "per_class.csv").exists()


def test_report_of_something_else_is_one_line_exit_2(tmp_path):
    r = cli("report", str(tmp_path), cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no run" in r.stderr


@pytest.mark.slow
def test_cli_and_api_runs_leave_the_same_directory_and_report(tmp_path):
    overrides = [*RUN, "strategy=partial"]
    visionft.fit(overrides, output_dir=tmp_path / "api")
    r = cli(*overrides, f"paths.output_dir={tmp_path / 'cli'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]

    def files(d: Path) -> set[str]:
        return {p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file() and not p.name.endswith(".log")
                and ".hydra" not in p.parts and "tb" not in p.parts}

    assert files(tmp_path / "api") == files(tmp_path / "cli")

    def card(d: Path) -> str:  # the run's own path, speed and time differ; everything else is the same
        text = (d / "README.md").read_text().replace(str(d), "RUN")
        return re.sub(r"[\d,.]+ train images/s|wall time [\d,.]+ s", "", text)

    assert card(tmp_path / "api") == card(tmp_path / "cli")
    assert "python -m visionft " + " ".join(overrides) + " paths.output_dir=RUN" in card(tmp_path / "cli")


def test_the_probe_path_reports_from_its_cached_features(tmp_path):
    run = visionft.fit([*RUN, "strategy=linear_probe"], output_dir=tmp_path / "probe")
    table = pd.read_csv(run.dir / "report" / "per_class.csv")
    assert table["f1"].mean() == pytest.approx(run.metrics["test"]["test/f1_macro"], abs=1e-4)
    assert (table["support"].sum(), run.metrics["data"]["test"]) == (48, 48)
    card = (run.dir / "README.md").read_text()
    assert "no gradient epochs" in card and not (run.dir / "report" / "curves.png").exists()
    # the card says how the head was fitted: by the solver, with the L2 chosen on val, not by an optimizer
    model = card.split("## Model and strategy")[1].split("## Metrics")[0]
    assert f"L2 {run.metrics['probe']['l2']:g} chosen on val" in model
    assert "AdamW" not in model and "WarmupCosine" not in model and "train images/s" not in model
    assert "| head |" in model and model.split("| head |")[1].split("\n")[0].split("|")[2].strip() == "solved"
    knn = run.metrics["probe"]["knn"]
    for k, acc in knn.items():  # a table row per k, not a Python dict
        assert f"| {k.split('=')[1]} | {acc['val']:.4g} | {acc['test']:.4g} |" in card
    assert "{'k=" not in card


def test_a_failed_export_still_leaves_the_report(tmp_path, monkeypatch):
    import visionft.export
    from visionft.outputs import ExportFailed
    from visionft.train import train

    def broken(*a, **k):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(visionft.export, "export", broken)
    cfg = visionft.compose([*RUN, "trainer.max_epochs=1", "export=onnx", f"paths.output_dir={tmp_path / 'x'}"])
    with pytest.raises(ExportFailed):
        train(cfg)
    card = (tmp_path / "x" / "README.md").read_text()
    assert "Export failed: RuntimeError: exporter exploded" in card
    assert (tmp_path / "x" / "report" / "confusion.png").is_file()


def test_confusion_matrix_stays_readable_at_100_classes(tmp_path):
    from visionft.report.plots import confusion

    rng = np.random.default_rng(0)
    matrix = rng.integers(0, 5, (100, 100)) + np.eye(100, dtype=int) * 50
    path = confusion(matrix, [f"class_name_{i}" for i in range(100)], tmp_path / "c.png")
    width, height = Image.open(path).size
    assert height / 100 >= 15 and width / 100 >= 15  # at least 15 pixels per class row and column


# -- sweeps ----------------------------------------------------------------------------------------------------
def fake_sweep(root: Path) -> dict:
    """A multirun directory: strategy x lr x 3 seeds; one job died before metrics.json, one after fit (no test
    metrics), and one group lost every seed."""
    rng = np.random.default_rng(1)
    truth, job = {}, 0
    for strategy in ("full", "lora"):
        for lr in ("0.001", "0.01"):
            for seed in (0, 1, 2):
                d = root / str(job)
                (d / ".hydra").mkdir(parents=True)
                (d / ".hydra" / "overrides.yaml").write_text(
                    f"- strategy={strategy}\n- +strategy.lr={lr}\n- seed={seed}\n- data.root=/d\n")
                acc = float(rng.uniform(0.5, 0.9))
                if (strategy, lr, seed) == ("full", "0.01", 1):
                    (d / "__main__.log").write_text("epoch 1\nerror: data.root=/d does not exist\n")
                elif (strategy, lr, seed) == ("full", "0.001", 2):
                    (d / "metrics.json").write_text(json.dumps({"val": {}, "test": {}, "trainable_params": 10}))
                elif (strategy, lr) == ("lora", "0.01"):
                    (d / "__main__.log").write_text("Traceback (most recent call last):\n  boom\n")
                else:
                    truth.setdefault((strategy, lr), []).append(acc)
                    (d / "metrics.json").write_text(json.dumps({
                        "val": {"val/acc": acc}, "test": {"test/acc": acc},
                        "trainable_params": 1000 if strategy == "full" else 10, "wall_time_s": 1.0,
                        "train_images_per_s": 100.0}))
                job += 1
    return truth


def test_sweep_report_groups_over_seeds_and_lists_failures(tmp_path):
    truth = fake_sweep(tmp_path / "sweep")
    r = cli("report", str(tmp_path / "sweep"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    groups = pd.read_csv(tmp_path / "sweep" / "report.csv", dtype={"strategy.lr": str})
    assert len(groups) == 4 and set(groups.columns) >= {"strategy", "strategy.lr", "n", "mean", "std", "failed"}
    for (strategy, lr), accs in truth.items():
        g = groups[(groups["strategy"] == strategy) & (groups["strategy.lr"] == lr)].iloc[0]
        assert g["n"] == len(accs) and g["mean"] == pytest.approx(np.mean(accs))
        assert g["std"] == pytest.approx(np.std(accs, ddof=1))
    lost = groups[(groups["strategy"] == "lora") & (groups["strategy.lr"] == "0.01")].iloc[0]
    assert (lost["n"], lost["failed"]) == (0, 3) and pd.isna(lost["mean"])
    runs = pd.read_csv(tmp_path / "sweep" / "runs.csv")
    assert len(runs) == 12 and runs["failed"].notna().sum() == 5
    md = (tmp_path / "sweep" / "report.md").read_text()
    assert "## Failed runs" in md and "data.root=/d does not exist" in md and "no val/acc in metrics.json" in md
    assert "12 runs, 5 failed" in md
    for png in ("metric.png", "params.png"):
        assert Image.open(tmp_path / "sweep" / png).size[0] > 300


def test_sweep_with_an_output_dir_keeps_numeric_order_and_counts_crashed_jobs(tmp_path):
    """A multirun with paths.output_dir=DIR writes DIR/<num> without .hydra: the overrides come from metrics.json;
    a job that crashed before its metrics still has its folder."""
    root = tmp_path / "mine"
    for job, depth in enumerate(("0", "2", "10")):
        for seed in (0, 1):
            d = root / str(2 * job + seed)
            d.mkdir(parents=True)
            (d / "overrides.yaml").write_text(f"- strategy.freeze_depth={depth}\n- seed={seed}\n")  # at start
            if (depth, seed) == ("2", 1):
                continue  # crashed
            (d / "metrics.json").write_text(json.dumps({
                "test": {"test/acc": 0.5 + 0.1 * job + 0.01 * seed}, "trainable_params": 100 - job}))
    r = cli("report", str(root), "--metric", "test/acc", cwd=tmp_path)  # these jobs recorded test only
    assert r.returncode == 0, r.stderr[-2000:]
    groups = pd.read_csv(root / "report.csv", dtype={"strategy.freeze_depth": str})
    assert list(groups["strategy.freeze_depth"]) == ["0", "2", "10"]
    assert list(groups["n"]) == [2, 1, 2] and list(groups["failed"]) == [0, 1, 0]
    assert groups["mean"].tolist() == pytest.approx([0.505, 0.6, 0.705])
    assert "no metrics.json" in (root / "report.md").read_text()
    bad = cli("report", str(root), "--metric", "trainable_params", cwd=tmp_path)
    assert bad.returncode == 2 and "must name a split" in bad.stderr


def test_a_truncated_metrics_json_fails_its_job_and_the_sweep_reports_the_rest(tmp_path):
    truth = fake_sweep(tmp_path / "sweep")
    job = tmp_path / "sweep" / "1"  # full, lr 0.001, seed 1: a finished job whose metrics.json a kill cut short
    text = (job / "metrics.json").read_text()
    lost = json.loads(text)["test"]["test/acc"]
    (job / "metrics.json").write_text(text[: len(text) // 2])
    r = cli("report", str(tmp_path / "sweep"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    runs = pd.read_csv(tmp_path / "sweep" / "runs.csv")
    assert len(runs) == 12 and runs["failed"].notna().sum() == 6
    assert runs.loc[runs["job"] == 1, "failed"].item().startswith("unreadable metrics.json (JSONDecodeError")
    groups = pd.read_csv(tmp_path / "sweep" / "report.csv", dtype={"strategy.lr": str})
    g = groups[(groups["strategy"] == "full") & (groups["strategy.lr"] == "0.001")].iloc[0]
    kept = [a for a in truth[("full", "0.001")] if a != lost]
    assert (g["n"], g["failed"]) == (1, 2) and g["mean"] == pytest.approx(np.mean(kept))
    md = (tmp_path / "sweep" / "report.md").read_text()
    assert "12 runs, 6 failed" in md and "unreadable metrics.json" in md


def test_the_report_of_a_run_with_a_truncated_metrics_json_is_one_line_exit_2(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text('{"val": {"val/acc": 0.5}, "te')
    r = cli("report", str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr[-2000:]
    assert "metrics.json is not readable (JSONDecodeError" in r.stderr


def _monitored_sweep(root: Path, monitor: str = "val/f1_macro") -> dict:
    """Two strategies x 2 seeds, each job with its config.yaml (the metric it monitored) and val and test values
    drawn independently, so that a report on the wrong split cannot match."""
    rng = np.random.default_rng(7)
    truth = {}
    for job, (strategy, seed) in enumerate([(s, seed) for s in ("full", "lora") for seed in (0, 1)]):
        d = root / str(job)
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(f"- strategy={strategy}\n- seed={seed}\n")
        (d / "config.yaml").write_text(f"seed: {seed}\ncallbacks:\n  monitor: {monitor}\n")
        values = {f"{split}/{name}": float(rng.uniform(0.3, 0.9)) for split in ("val", "test")
                  for name in ("acc", "f1_macro")}
        (d / "metrics.json").write_text(json.dumps({"val": {k: v for k, v in values.items() if k.startswith("val")},
                                                    "test": {k: v for k, v in values.items() if k.startswith("test")},
                                                    "trainable_params": 10 if strategy == "lora" else 1000}))
        truth[job] = (strategy, values)
    return truth


def test_sweep_report_compares_on_the_monitored_validation_metric_with_test_beside_it(tmp_path):
    truth = _monitored_sweep(tmp_path / "sweep")
    r = cli("report", str(tmp_path / "sweep"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    runs = pd.read_csv(tmp_path / "sweep" / "runs.csv")
    for job, (strategy, values) in truth.items():  # every job's own val and test values, side by side
        row = runs[runs["job"] == job].iloc[0]
        assert (row["val/f1_macro"], row["test/f1_macro"]) == pytest.approx(
            (values["val/f1_macro"], values["test/f1_macro"]))
    groups = pd.read_csv(tmp_path / "sweep" / "report.csv")
    for strategy in ("full", "lora"):
        mine = [v for s, v in truth.values() if s == strategy]
        g = groups[groups["strategy"] == strategy].iloc[0]
        assert g["mean"] == pytest.approx(np.mean([v["val/f1_macro"] for v in mine]))  # compared on validation
        assert g["std"] == pytest.approx(np.std([v["val/f1_macro"] for v in mine], ddof=1))
        assert g["test/f1_macro mean"] == pytest.approx(np.mean([v["test/f1_macro"] for v in mine]))
    md = (tmp_path / "sweep" / "report.md").read_text()
    assert "compared on `val/f1_macro`, `test/f1_macro` beside it" in md
    assert "val/f1_macro mean ± std" in md and "test/f1_macro mean ± std" in md
    chosen = cli("report", str(tmp_path / "sweep"), "--metric", "test/acc", cwd=tmp_path)  # asked for: still works
    assert chosen.returncode == 0 and "tunes the choice to the test set" in chosen.stdout


def test_a_sweep_whose_jobs_monitored_different_metrics_asks_which_to_compare(tmp_path):
    _monitored_sweep(tmp_path / "sweep")
    (tmp_path / "sweep" / "3" / "config.yaml").write_text("callbacks:\n  monitor: val/loss\n")
    r = cli("report", str(tmp_path / "sweep"), cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr[-2000:]
    assert "monitored different metrics (val/f1_macro, val/loss): pass --metric" in r.stderr


def test_a_job_that_failed_on_a_user_error_is_listed_with_its_one_line_reason(tmp_path):
    """A multirun job stopped by a user error leaves error.txt (its one line) and perhaps nothing else."""
    truth = fake_sweep(tmp_path / "sweep")
    reason = "strategy.freeze_depth=9 is out of range for this backbone: freeze_depth must be in 0..5"
    bad = tmp_path / "sweep" / "12"
    (bad / ".hydra").mkdir(parents=True)
    (bad / ".hydra" / "overrides.yaml").write_text("- strategy=full\n- +strategy.lr=0.001\n- seed=3\n")
    (bad / "__main__.log").write_text("")  # what a job's log held before: nothing
    (bad / "error.txt").write_text(reason + "\n")
    r = cli("report", str(tmp_path / "sweep"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    runs = pd.read_csv(tmp_path / "sweep" / "runs.csv")
    assert runs.loc[runs["job"] == 12, "failed"].item() == reason
    groups = pd.read_csv(tmp_path / "sweep" / "report.csv", dtype={"strategy.lr": str})
    g = groups[(groups["strategy"] == "full") & (groups["strategy.lr"] == "0.001")].iloc[0]
    assert (g["n"], g["failed"]) == (len(truth[("full", "0.001")]), 2)  # counted as failed, the rest kept
    md = (tmp_path / "sweep" / "report.md").read_text()
    assert "13 runs, 6 failed" in md and f"| 12 | full | 0.001 | 3 | {reason} |" in md


def test_the_params_plot_labels_its_x_ticks_when_every_count_lies_in_one_decade(tmp_path, monkeypatch):
    from visionft.report import plots

    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)  # the figure params.png gets
    counts = [267_264, 300_000, 373_658]  # all within 1e5..1e6: no power of ten inside the view
    groups = pd.DataFrame({"k": ["a", "b", "c"], "trainable_params": counts, "mean": [0.5, 0.6, 0.7],
                           "std": [0.01, 0.02, None]})
    plots.sweep_params(groups, ["k"], "val/acc", tmp_path / "params.png")
    drawn[0].draw_without_rendering()
    ax = drawn[0].axes[0]
    low, high = ax.get_xlim()
    shown = [label.get_text() for tick, label in zip(ax.get_xticks(), ax.get_xticklabels()) if low <= tick <= high]
    assert shown == ["267k", "300k", "374k"]


def test_the_card_lists_a_val_metric_logged_without_a_split_prefix(tmp_path):
    from visionft.report.card import model_card

    metrics = {"strategy": "full", "backbone": "test_resnet", "val": {"val/acc": 0.5, "countdown": 3.0},
               "test": {"test/acc": 0.25}}
    card = model_card(tmp_path, metrics, None, [], {})
    rows = {line.split("|")[1].strip(): line for line in card.splitlines() if line.startswith("|")}
    assert "0.25" in rows["acc"] and "3" in rows["countdown"], card
