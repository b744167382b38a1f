"""train -> export -> predict round trips, self-checks, and what the artifact carries."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from visionft.export import FORMATS, ExportCheckFailed, check_parity, export, load_trained
from visionft.predict import load_runner, predict
from visionft.train import train

ODD = "out dir (v1), a=b, ü"  # spaces, parentheses, comma, '=', non-ASCII: Hydra overrides reject these


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short run per (model, strategy), shared by the tests below."""
    from conftest import TINY, compose_cfg

    runs = {}
    for name, extra in {"resnet": ["backbone.name=test_resnet"],
                        "vit_lora": ["backbone.name=test_vit", "data.image_size=32", "strategy=lora"],
                        "resnet_dora": ["backbone.name=test_resnet", "strategy=dora"]}.items():
        out = tmp_path_factory.mktemp(name)
        cfg = compose_cfg([*TINY, *extra, "data.num_classes=4", "trainer.max_epochs=2"], out)
        runs[name] = Path(train(cfg)["best_checkpoint"])
    return runs


def _images(folder: Path, n: int = 5) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), np.uint8)).save(folder / "rgb.jpg")
    Image.fromarray(rng.integers(0, 255, (30, 30), np.uint8)).save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 255, (30, 30, 4), np.uint8), "RGBA").save(folder / "rgba.png")
    Image.fromarray(rng.integers(0, 255, (30, 30, 4), np.uint8), "CMYK").save(folder / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: EXIF orientation must be honoured
    Image.fromarray(rng.integers(0, 255, (20, 60, 3), np.uint8)).save(folder / "exif.jpg", exif=exif)
    (folder / "broken.png").write_bytes(b"not an image")
    return folder


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("run", ["resnet", "vit_lora", "resnet_dora"])
def test_export_then_predict_round_trip(trained, run, fmt, tmp_path):
    out = tmp_path / ODD
    artifact, report = export(trained[run], fmt, out)
    assert artifact.is_file() and report["inputs"].endswith("held-out test images")
    assert report["batch_1"]["max_abs_diff"] <= 1e-4 and report["batch_40"]["max_abs_diff"] <= 1e-4  # 40 test images
    assert report["batch_40"]["top1_agreement"] == 1.0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["label_names"] == [f"class_{i}" for i in range(4)] and cfg["num_classes"] == 4
    assert cfg["pretrained_cfg"]["input_size"][-1] == 32 and cfg["pretrained_cfg"]["mean"]
    images = _images(tmp_path / "imgs, (odd)")
    rows, failed = predict(artifact, [str(images)], topk=3, out=out / "preds.csv")
    assert [Path(p).name for p, _ in failed] == ["broken.png"]
    assert sorted(Path(r["path"]).name for r in rows) == ["cmyk.jpg", "exif.jpg", "gray.png", "rgb.jpg", "rgba.png"]
    for r in rows:
        probs = [r["prob_1"], r["prob_2"], r["prob_3"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-5
        assert r["label_1"].startswith("class_")
    assert len(list(csv.DictReader(open(out / "preds.csv")))) == 5


def test_artifacts_need_neither_peft_nor_visionft(trained, tmp_path):
    out = tmp_path / "ts"
    artifact, _ = export(trained["vit_lora"], "torchscript", out)
    code = ("import sys, torch; sys.modules['peft'] = None; sys.modules['visionft'] = None; "
            f"m = torch.jit.load({str(artifact)!r}); print(m(torch.randn(2, 3, 32, 32)).shape)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "torch.Size([2, 4])" in r.stdout, r.stderr[-1500:]


def test_weights_load_with_timm_local_dir_and_keep_the_head(trained, tmp_path):
    out = tmp_path / "hf"
    export(trained["resnet"], "exported_program", out)
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    reference, meta, _ = load_trained(trained["resnet"])
    assert model.get_classifier().out_features == 4 and model.pretrained_cfg["label_names"] == meta["classes"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), reference(x), atol=1e-5)


def test_parity_check_catches_a_broken_artifact(trained, tmp_path):
    artifact, _ = export(trained["resnet"], "torchscript", tmp_path / "ok")
    model, meta, _ = load_trained(trained["resnet"])
    broken = torch.jit.load(str(artifact))
    with torch.no_grad():
        broken.fc.weight.add_(0.05 * torch.randn_like(broken.fc.weight))
    x = torch.randn(8, 3, 32, 32)
    with pytest.raises(ExportCheckFailed, match="max \\|diff\\|"):
        check_parity(model, lambda t: broken(t), x, "synthetic")
    check_parity(model, load_runner(artifact), x, "synthetic")  # the intact one passes


@pytest.mark.slow
def test_real_vit_small_exports_at_a_non_default_size(tmp_path):
    from conftest import TINY, compose_cfg

    cfg = compose_cfg([*TINY, "backbone=vit_small", "backbone.pretrained=false", "data.image_size=48",
                       "data.train_size=40", "data.test_size=8", "data.num_classes=4", "trainer.limit_train_batches=1",
                       "trainer.limit_val_batches=1", "export=torchscript"], tmp_path / "vit")
    metrics = train(cfg)
    artifact = Path(metrics["artifacts"][-1])
    assert artifact.name == "model.pt"
    check = json.loads((artifact.parent / "export_check.json").read_text())
    assert check["batch_1"]["max_abs_diff"] <= 1e-4
    assert torch.jit.load(str(artifact))(torch.randn(1, 3, 48, 48)).shape == (1, 4)


def test_cli_export_and_predict_take_odd_paths(trained, tmp_path):
    out = tmp_path / ODD
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "visionft", "export", "--ckpt", str(trained["resnet"]), "--format",
                        "onnx", "--out", str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "model.onnx").is_file()
    images = _images(tmp_path / "in (1), x=y")
    r = subprocess.run([sys.executable, "-m", "visionft", "predict", "--model", str(out / "model.onnx"), "--inputs",
                        str(images / "rgb.jpg"), str(images / "broken.png"), "--topk", "2", "--out",
                        str(out / "p.csv")], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "unreadable" in r.stderr and "broken.png" in r.stderr
    assert len(list(csv.DictReader(open(out / "p.csv")))) == 1
