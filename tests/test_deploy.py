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


def test_parity_tolerance_follows_the_logits_scale(trained):
    """Exporters reorder float ops, so their error grows with the logits: a 1e-7 relative error on logits in the
    thousands passes (an absolute 1e-4 bound failed ONNX on real photos); a real defect still fails."""
    base, _, _ = load_trained(trained["resnet"])

    class Scaled(torch.nn.Module):
        def __init__(self, scale):
            super().__init__()
            self.base, self.scale = base, scale

        def forward(self, x):
            return self.base(x) * self.scale

    model = Scaled(1e4 / base(torch.randn(8, 3, 32, 32)).abs().max().item())
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    report = check_parity(model, lambda t: model(t) * (1 + 2e-7), x, "synthetic")
    assert 1e-4 < report["batch_8"]["max_abs_diff"] < report["batch_8"]["tolerance"]
    with pytest.raises(ExportCheckFailed, match="max \\|diff\\|"):
        check_parity(model, lambda t: model(t) + 0.01 * ref.abs().max(), x, "synthetic")


def test_unknown_export_format_fails_before_training(tiny_cfg, tmp_path):
    out = tmp_path / "bogus"
    with pytest.raises(ValueError, match="export=tflite is not an export format; valid: torchscript"):
        train(tiny_cfg("export=tflite", output_dir=out))
    assert not (out / "checkpoints").exists()


def test_export_failure_after_training_keeps_the_run(tiny_cfg, tmp_path, monkeypatch):
    import visionft.export
    from visionft.outputs import ExportFailed

    def broken(*args, **kwargs):
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(visionft.export, "export", broken)
    out = tmp_path / "run"
    with pytest.raises(ExportFailed, match="export=onnx failed after training.*exporter crashed.*visionft export"):
        train(tiny_cfg("export=onnx", output_dir=out))
    saved = json.loads((out / "metrics.json").read_text())
    assert "test/acc" in saved["test"] and "exporter crashed" in saved["export_error"]
    assert (out / "config.yaml").is_file()


def _labelled_folder(root: Path, per_split: dict[str, int], classes: int = 3) -> Path:
    """Class-coloured, non-square PNGs (lossless) in root/{train,val,test}/<class>/: cropping changes the input."""
    rng = np.random.default_rng(0)
    palette = rng.uniform(40, 215, (classes, 3))
    for split, n in per_split.items():
        for c in range(classes):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                h, w = rng.integers(36, 48), rng.integers(50, 70)
                img = palette[c] + rng.normal(0, 60, (h, w, 3))
                img[: h // 3] = rng.uniform(0, 255, 3)  # a distractor band the center crop may or may not cut
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / split / f"c{c}" / f"{i}.png")
    return root


def test_predict_on_a_labelled_folder_reproduces_the_runs_own_evaluation(tmp_path):
    """The run evaluates test/ with its datamodule's geometry (eval_crop_pct=1.0 here, unlike test_resnet's 0.95);
    `visionft predict` on the same folder must see the same pixels: identical probabilities, identical accuracy."""
    from conftest import TINY, compose_cfg

    root = _labelled_folder(tmp_path / "data", {"train": 24, "val": 4, "test": 10})
    tiny = [o for o in TINY if not o.startswith("data.")]
    cfg = compose_cfg([*tiny, "data=imagefolder", f"data.root={root}", "data.image_size=32", "data.num_workers=0",
                       "data.batch_size=16", "data.eval_crop_pct=1.0", "trainer.max_epochs=2", "export=torchscript"],
                      tmp_path / "run")
    metrics = train(cfg)
    artifact = Path(metrics["artifacts"][-1])
    rows, failed = predict(artifact, [str(root / "test")], topk=1)
    assert not failed and len(rows) == 30
    hits = [r["label_1"] == Path(r["path"]).parent.name for r in rows]
    assert sum(hits) / len(hits) == pytest.approx(metrics["test"]["test/acc"], abs=1e-6)  # 1 image = 0.033
    # and image by image, against the trained model on the run's own test loader
    from visionft.train import build

    dm, _, module = build(cfg)
    module.load_state_dict(torch.load(metrics["best_checkpoint"], weights_only=True)["state_dict"])
    module.eval()
    with torch.no_grad():
        probs = torch.cat([module(x).softmax(-1) for x, _ in dm.test_dataloader()])
    files = [str(p) for p in dm.splits["test"].images]
    by_path = {r["path"]: r["prob_1"] for r in rows}
    got = torch.tensor([by_path[f] for f in files])
    assert torch.allclose(got, probs.max(1).values, atol=1e-5)


def test_predict_takes_a_checkpoint_or_a_run_directory_and_scores_a_labelled_folder(tmp_path, capsys):
    """`--model` may be the exported artifact, the run's best.ckpt or the run directory: the same rows. On a
    labelled folder (<folder>/<class>/...) each row carries the folder's class, and the accuracy printed is the
    fraction of top-1 labels equal to it."""
    from conftest import TINY, compose_cfg

    from visionft import cli
    from visionft.predict import accuracy

    root = _labelled_folder(tmp_path / "data", {"train": 24, "val": 4, "test": 10})
    tiny = [o for o in TINY if not o.startswith("data.")]
    cfg = compose_cfg([*tiny, "data=imagefolder", f"data.root={root}", "data.image_size=32", "data.num_workers=0",
                       "data.batch_size=16", "trainer.max_epochs=2", "export=torchscript"], tmp_path / "run")
    metrics = train(cfg)
    artifact, best = Path(metrics["artifacts"][-1]), tmp_path / "run" / "checkpoints" / "best.ckpt"
    assert metrics["final_checkpoint"] == str(best)
    got = {m: predict(m, [str(root / "test")], topk=2)[0] for m in (artifact, best, tmp_path / "run")}
    for rows in got.values():
        assert [(r["path"], r["label_1"], r["label_2"]) for r in rows] == \
            [(r["path"], r["label_1"], r["label_2"]) for r in got[artifact]]
        assert [r["prob_1"] for r in rows] == pytest.approx([r["prob_1"] for r in got[artifact]], abs=1e-5)
        assert [r["true_label"] for r in rows] == [Path(r["path"]).parent.name for r in rows]
    truth = [Path(r["path"]).parent.name for r in got[best]]  # the folder names, read independently
    fraction = sum(r["label_1"] == t for r, t in zip(got[best], truth)) / len(truth)
    assert accuracy(got[best]) == (fraction, 30)
    out = tmp_path / "preds.csv"
    argv = ["--model", str(tmp_path / "run"), "--inputs", str(root / "test"), "--out", str(out)]
    assert cli.run("predict", argv) == 0
    printed = capsys.readouterr().out
    assert f"accuracy {fraction:.4f} (top-1, 30 images" in printed, printed
    csv_rows = list(csv.DictReader(open(out)))
    assert [r["true_label"] for r in csv_rows] == [Path(r["path"]).parent.name for r in csv_rows]
    # the data root holds train/ val/ test/, not class folders: no label, no accuracy
    rows, _ = predict(best, [str(root)], topk=1)
    assert len(rows) == 114 and accuracy(rows) is None and "true_label" not in rows[0]


def test_predict_refuses_a_bad_topk_and_inputs_with_no_readable_image(tmp_path, capsys):
    """`--topk 0` / `--topk -3` and inputs with no readable image (which exited 0 with "0 images predicted") are
    one line each, exit 2, checked before the model is loaded where they can be."""
    from conftest import TINY, compose_cfg

    from visionft import cli

    for k in ("0", "-3"):
        assert cli.run("predict", ["--model", str(tmp_path / "any.pt"), "--inputs", str(tmp_path), "--topk", k]) == 2
        assert capsys.readouterr().err.strip() == f"error: --topk {k} must be an integer >= 1"
    cfg = compose_cfg([*TINY, "trainer.max_epochs=1"], tmp_path / "run")
    train(cfg)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jpg").write_bytes(b"not an image")
    assert cli.run("predict", ["--model", str(tmp_path / "run"), "--inputs", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert any(line.startswith("unreadable:") for line in err) and err[-1].startswith("error: no readable image under")
