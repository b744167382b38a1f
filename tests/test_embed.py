"""`visionft embed` through the real CLI: features of a trained checkpoint for a labelled folder and for a dataset
split, checked against the checkpoint's own predictions and the datamodule's labels."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from test_deploy import _labelled_folder

import visionft
from visionft.train import build, train


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "visionft", "embed", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from conftest import TINY, compose_cfg

    out = tmp_path_factory.mktemp("embed-run")
    cfg = compose_cfg([*TINY, "data.num_classes=3"], out)
    return cfg, train(cfg)


def test_embed_a_labelled_folder_gives_the_features_the_checkpoint_classifies(run, tmp_path):
    cfg, m = run
    folder = _labelled_folder(tmp_path / "imgs", {"test": 3})
    done = _cli("--ckpt", m["best_checkpoint"], "--inputs", folder / "test", "--out", tmp_path / "f.npz", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    d = np.load(tmp_path / "f.npz")
    assert d["features"].shape[0] == 9 and list(d["classes"]) == ["c0", "c1", "c2"]
    assert [int(v) for v in d["labels"]] == [int(p.split("/")[-2][1]) for p in d["paths"]]
    sd = torch.load(m["best_checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    probs = (torch.from_numpy(d["features"]) @ sd["model.fc.weight"].T + sd["model.fc.bias"]).softmax(-1)
    rows = visionft.load(m["best_checkpoint"]).predict(list(d["paths"]), topk=1)  # the whole model, per file
    assert np.allclose(probs.max(1).values.numpy(), [r["prob_1"] for r in rows], atol=1e-5)


def test_embed_a_dataset_split(run, tmp_path):
    cfg, m = run
    dm, _, _ = build(cfg)
    dm.setup()
    done = _cli("--ckpt", m["best_checkpoint"], "--data", "synthetic", "--split", "test", "--out", tmp_path / "t.npz",
                "data.num_classes=3", "data.train_size=160", "data.test_size=40", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    d = np.load(tmp_path / "t.npz")
    assert np.array_equal(d["labels"], dm.splits["test"].labels) and d["features"].shape[0] == 40
    # --data run: the checkpoint's own data config and splits (its val split, not a preset's defaults)
    done = _cli("--ckpt", m["best_checkpoint"], "--data", "run", "--split", "val", "--out", tmp_path / "v.npz",
                cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert np.array_equal(np.load(tmp_path / "v.npz")["labels"], dm.splits["val"].labels)


def test_embed_errors_are_one_line(run, tmp_path):
    cfg, m = run
    bad = _cli("--ckpt", m["best_checkpoint"], "--inputs", tmp_path, "--out", tmp_path / "f.txt", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip() == (f"error: --out {tmp_path / 'f.txt'}: "
                                                          "the output must end in .npz or .parquet")
    empty = _cli("--ckpt", m["best_checkpoint"], "--inputs", tmp_path, "--out", tmp_path / "f.npz", cwd=tmp_path)
    assert empty.returncode == 2 and "no images found" in empty.stderr and "Traceback" not in empty.stderr


def test_embed_skips_and_lists_unreadable_files(run, tmp_path):
    from PIL import Image

    cfg, m = run
    folder = _labelled_folder(tmp_path / "imgs", {"test": 2}) / "test"
    good = sorted(str(p) for p in folder.rglob("*.png"))
    buf = tmp_path / "whole.jpg"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(buf, quality=95)
    (folder / "c1" / "truncated.jpg").write_bytes(buf.read_bytes()[: buf.stat().st_size // 2])
    (folder / "c2" / "empty.png").write_bytes(b"")
    done = _cli("--ckpt", m["best_checkpoint"], "--inputs", folder, "--out", tmp_path / "f.npz", cwd=tmp_path)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-1500:]
    unreadable = sorted(line.split(": ")[1] for line in done.stderr.splitlines() if line.startswith("unreadable: "))
    assert unreadable == [str(folder / "c1" / "truncated.jpg"), str(folder / "c2" / "empty.png")]
    d = np.load(tmp_path / "f.npz")
    assert sorted(d["paths"]) == good and d["features"].shape[0] == 6 and "6 images embedded" in done.stdout
    assert [int(v) for v in d["labels"]] == [int(p.split("/")[-2][1]) for p in d["paths"]]
    sd = torch.load(m["best_checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    probs = (torch.from_numpy(d["features"]) @ sd["model.fc.weight"].T + sd["model.fc.bias"]).softmax(-1)
    rows = visionft.load(m["best_checkpoint"]).predict(list(d["paths"]), topk=1)  # each row is its own file's
    assert np.allclose(probs.max(1).values.numpy(), [r["prob_1"] for r in rows], atol=1e-5)


def test_embed_with_no_readable_image_is_one_error(run, tmp_path):
    from visionft.embed import embed_command
    from visionft.errors import UsageError

    cfg, m = run
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(b"")
    with pytest.raises(UsageError, match=r"none of the 1 images could be read \(first: .*a.png: empty file"):
        embed_command(str(tmp_path / "f.npz"), [str(tmp_path / "in")], ckpt=m["best_checkpoint"])
    assert not (tmp_path / "f.npz").exists()
