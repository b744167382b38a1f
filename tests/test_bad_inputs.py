"""Inputs that must never end in a traceback: file names that are not UTF-8, a one-class folder, a pickle passed
off as an exported model, a timm name given as a trained model, and a checkpoint whose stored backbone name points
timm at a folder of the checkpoint author's choosing."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY

from visionft.errors import UsageError

FOLDER_RUN = ["data=imagefolder", "backbone.name=test_resnet", "backbone.pretrained=false", "data.batch_size=4",
              "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu",
              "trainer.devices=1", "data.num_workers=0"]


def _png(path: bytes, seed: int) -> None:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _main(monkeypatch, capsys, *overrides: str) -> tuple[int, str]:
    """The training CLI in this process: (exit code, stderr)."""
    from visionft.__main__ import main

    monkeypatch.setattr(sys, "argv", ["visionft", *overrides])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def _cli(*args: str) -> subprocess.CompletedProcess:
    """A ``visionft`` command in a fresh process whose stdout is strict UTF-8 (as under an en_US.UTF-8 locale;
    C.UTF-8 would pass undecodable bytes through)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, "-m", "visionft", *args], capture_output=True, env=env, timeout=300)


@pytest.mark.slow
def test_file_names_that_are_not_utf8_train_and_predict(tmp_path, monkeypatch, capsys):
    """``caf\\xe9.png`` (Latin-1 bytes in the name) is an image like any other: training uses it (c4a2980: a
    UnicodeEncodeError hashing the split), bad_images.csv names a broken one, and predict prints and writes its
    row with the byte shown as ``\\xe9`` (c4a2980: UnicodeEncodeError printing it and writing the CSV)."""
    root, seed = tmp_path / "data", 0
    for split, n in (("train", 5), ("val", 2), ("test", 2)):
        for c in ("cat", "dog"):
            folder = os.fsencode(root / split / c)
            os.makedirs(folder)
            for name in [b"%d.png" % i for i in range(n)] + [b"caf\xe9.png"]:
                seed += 1
                _png(os.path.join(folder, name), seed)
    (root / "train" / "dog").joinpath(os.fsdecode(b"bro\xefken.png")).write_bytes(b"not an image")
    run = tmp_path / "run"
    code, err = _main(monkeypatch, capsys, *FOLDER_RUN, f"data.root={root}", f"paths.output_dir={run}")
    assert code == 0, err
    import json

    on_disk = {s: sum(1 for c in ("cat", "dog") for f in os.listdir(os.fsencode(root / s / c))
                      if f != b"bro\xefken.png") for s in ("train", "val", "test")}
    assert json.loads((run / "metrics.json").read_text())["data"] == on_disk == {"train": 12, "val": 6, "test": 6}
    bad = list(csv.reader((run / "bad_images.csv").read_text(encoding="utf-8").splitlines()))
    assert bad[1][0] == f"{root}/train/dog/bro\\xefken.png"

    r = _cli("predict", "--model", str(run), "--inputs", str(root / "test"))
    out = r.stdout.decode("utf-8")  # strict: no undecodable byte reaches stdout
    assert r.returncode == 0, r.stderr.decode()
    shown = {line.split(" ")[0]: line.split(" ")[1] for line in out.splitlines() if line.startswith(str(root))}
    assert len(shown) == 6 and {f"{root}/test/{c}/caf\\xe9.png" for c in ("cat", "dog")} <= set(shown)
    assert "6 images predicted" in out
    from visionft import cli

    written = tmp_path / "predictions.csv"
    assert cli.run("predict", ["--model", str(run), "--inputs", str(root / "test"), "--out", str(written)]) == 0
    rows = {row["path"]: row for row in csv.DictReader(written.read_text(encoding="utf-8").splitlines())}
    assert set(rows) == set(shown) and all(rows[p]["label_1"] == shown[p] for p in rows)
    assert rows[f"{root}/test/cat/caf\\xe9.png"]["true_label"] == "cat"


def _folder(root: Path, layout: dict[str, int]) -> Path:
    """``layout``: 'split/class' (or 'class') -> number of PNGs written there."""
    for i, (where, n) in enumerate(layout.items()):
        (root / where).mkdir(parents=True)
        for j in range(n):
            _png(str(root / where / f"{j}.png"), 100 * i + j)
    return root


def test_a_one_class_folder_is_one_line_before_any_image_is_read(tmp_path, monkeypatch, capsys):
    """c4a2980: torchmetrics' 'Expected argument `num_classes` to be an integer larger than 1, but got 1' after a
    26-line traceback, once every image had been checked and the model built."""
    import datamodules.imagefolder

    def never(*args, **kwargs):
        raise AssertionError("images were read")

    root = _folder(tmp_path / "one", {"cat": 3})
    monkeypatch.setattr(datamodules.imagefolder, "check_files", never)
    code, err = _main(monkeypatch, capsys, *FOLDER_RUN, f"data.root={root}", f"paths.output_dir={tmp_path / 'r1'}")
    assert code == 2 and err.strip().splitlines() == [
        f"error: data.root={root} has one class (cat): classification needs at least two class folders, "
        f"{root}/<class>/<image>; add a folder of images for each other class"]
    monkeypatch.undo()
    root = _folder(tmp_path / "split", {"train/cat": 3, "train/dog": 0, "val/cat": 1})
    (root / "train" / "dog" / "a.png").write_bytes(b"not an image")
    code, err = _main(monkeypatch, capsys, *FOLDER_RUN, f"data.root={root}", f"paths.output_dir={tmp_path / 'r2'}")
    assert code == 2 and err.strip().splitlines()[-1] == (
        f"error: data.root={root} has one class in train/ (cat; 'dog' has no usable image): classification needs "
        f"at least two class folders, {root}/train/<class>/<image>; add a folder of images for each other class")


def test_val_and_test_folders_may_hold_one_class(tmp_path):
    """Two training classes, val/ and test/ with one each: a legitimate run; its splits are the files on disk."""
    from datamodules import ImageFolderDataModule

    root = _folder(tmp_path / "d", {"train/cat": 3, "train/dog": 3, "val/cat": 2, "test/dog": 2})
    dm = ImageFolderDataModule(root=str(root), batch_size=2, resident=False)
    dm.setup()
    assert dm.classes == ["cat", "dog"]
    assert {s: sorted(Path(p).relative_to(root).as_posix() for p in dm.splits[s].images) for s in ("val", "test")} \
        == {"val": ["val/cat/0.png", "val/cat/1.png"], "test": ["test/dog/0.png", "test/dog/1.png"]}


class _Marker:
    """Unpickling this creates ``path``: proof that a loader unpickled the file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _config_json(folder: Path, classes: int = 2) -> None:
    import json

    pre = {"input_size": [3, 32, 32], "interpolation": "bilinear", "crop_pct": 1.0, "mean": [0.5] * 3, "std": [0.5] * 3}
    (folder / "config.json").write_text(json.dumps({"pretrained_cfg": pre, "num_classes": classes,
                                                    "label_names": [f"c{i}" for i in range(classes)]}))


def test_a_pickle_named_model_pt_or_pt2_is_never_unpickled(tmp_path, capsys):
    """A pickle (plain, or torch.save's zip) named model.pt / model.pt2: one line, exit 2, the marker its unpickling
    would create never appears (c4a2980: 26 to 41 lines of torch's RuntimeError/BadZipFile traceback). A real
    TorchScript and torch.export archive beside them still predict."""
    import pickle

    import torch

    from visionft import cli

    images = _folder(tmp_path / "images", {"a": 2})
    marker = tmp_path / "unpickled"
    for how in ("pickle", "torch.save"):
        for name in ("model.pt", "model.pt2"):
            folder = tmp_path / how.replace(".", "_") / name.replace(".", "_")
            folder.mkdir(parents=True)
            _config_json(folder)
            if how == "pickle":
                (folder / name).write_bytes(pickle.dumps(_Marker(str(marker))))
            else:
                torch.save({"model": _Marker(str(marker))}, folder / name)
            assert cli.run("predict", ["--model", str(folder / name), "--inputs", str(images)]) == 2
            kind = "TorchScript archive" if name == "model.pt" else "torch.export archive"
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith(f"error: --model {folder / name} is not a {kind}"), err
            assert "--model takes an exported model.pt (TorchScript), model.onnx or model.pt2" in err[0]
    assert not marker.exists()
    pickle.loads(pickle.dumps(_Marker(str(marker))))  # the marker works: unpickling does create it
    assert marker.exists()

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    real = tmp_path / "real"
    real.mkdir()
    _config_json(real)
    torch.jit.save(torch.jit.script(net), real / "model.pt")
    batch = torch.export.Dim("batch", max=64)
    torch.export.save(torch.export.export(net, (torch.randn(2, 3, 32, 32),), dynamic_shapes=({0: batch},)),
                      real / "model.pt2")
    for name in ("model.pt", "model.pt2"):
        assert cli.run("predict", ["--model", str(real / name), "--inputs", str(images)]) == 0
        assert "2 images predicted" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["resnet18.a1_in1k", "hf-hub:timm/resnet18.a1_in1k"])
def test_a_timm_name_as_model_says_what_model_takes(tmp_path, capsys, name):
    """c4a2980: 'error: config.json is missing: predict needs the config.json written by `visionft export`'."""
    from visionft import cli

    assert cli.run("predict", ["--model", name, "--inputs", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --model {name} is a timm model name, not a trained model: "
                                               f"--model takes an exported model.pt (TorchScript), model.onnx or "
                                               f"model.pt2 (torch.export), a visionft .ckpt, or a run directory"), err
    assert cli.run("predict", ["--model", str(tmp_path / "nope.pt"), "--inputs", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().startswith(f"error: --model {tmp_path / 'nope.pt'} does not exist: ")


_WATCHED: list[str] = []  # folders whose opening the audit hook records
_OPENED: list[str] = []


def _audit(event: str, args: tuple) -> None:
    if _WATCHED and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0])
        if any(path.startswith(w) for w in _WATCHED):
            _OPENED.append(path)


sys.addaudithook(_audit)  # Python's own record of every file opened in this process


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    from conftest import compose_cfg

    from visionft.train import train

    out = tmp_path_factory.mktemp("tiny") / "run"
    train(compose_cfg([*TINY, "data.train_size=64", "data.test_size=16"], out))
    return out / "checkpoints" / "best.ckpt"


def _with_backbone_name(ckpt: Path, name: str, out: Path) -> Path:
    import torch

    stored = torch.load(ckpt, map_location="cpu", weights_only=True)
    stored["visionft"]["timm_name"] = name
    stored["hyper_parameters"]["backbone"]["name"] = name
    torch.save(stored, out)
    return out


def test_a_checkpoint_naming_a_folder_as_its_backbone_is_refused_unread(tmp_path, capsys, tiny_ckpt):
    """A checkpoint whose stored backbone name is ``local-dir:<folder>``: export, predict and embed refuse it in one
    line and never open ``<folder>/config.json`` (c4a2980: timm read it and built what it described)."""
    from visionft import cli

    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.json").write_text('{"architecture": "test_resnet", "model_args": {}, "pretrained_cfg": {}}')
    crafted = _with_backbone_name(tiny_ckpt, f"local-dir:{evil}", tmp_path / "crafted.ckpt")
    images = _folder(tmp_path / "images", {"a": 1})
    said = {}
    _WATCHED.append(str(evil))
    try:
        for command, argv in (("export", ["--ckpt", str(crafted), "--format", "torchscript", "--out",
                                          str(tmp_path / "export")]),
                              ("predict", ["--model", str(crafted), "--inputs", str(images)]),
                              ("embed", ["--ckpt", str(crafted), "--inputs", str(images), "--out",
                                         str(tmp_path / "f.npz")])):
            said[command] = (cli.run(command, argv), capsys.readouterr().err.strip().splitlines()[-1:])
    finally:
        _WATCHED.clear()
    assert not _OPENED, f"opened {_OPENED}"
    line = (f"error: {crafted}: its stored backbone name 'local-dir:{evil}' is not a timm model name: a checkpoint's "
            f"model is rebuilt from an architecture timm lists (timm.list_models()) and its own weights, never from a "
            f"folder, file or hub repo it names: refusing to build the model; retrain it with a backbone.name timm "
            f"lists")
    assert said == {command: (2, [line]) for command in ("export", "predict", "embed")}
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("name", ["hf-hub:someone/resnet18", "hf_hub:someone/resnet18", "../evil", "x/resnet18"])
def test_a_checkpoint_naming_a_hub_repo_or_path_as_its_backbone_is_refused(tmp_path, capsys, tiny_ckpt, name):
    from visionft import cli

    crafted = _with_backbone_name(tiny_ckpt, name, tmp_path / "crafted.ckpt")
    assert cli.run("export", ["--ckpt", str(crafted), "--format", "torchscript"]) == 2
    assert capsys.readouterr().err.strip().startswith(
        f"error: {crafted}: its stored backbone name {name!r} is not a timm model name")


def test_a_checkpoint_from_timms_own_hub_repo_still_rebuilds(tmp_path, tiny_ckpt):
    """``hf-hub:timm/<model>`` (timm's own repository of a model it lists, as older checkpoints record a hub name)
    is rebuilt as that model, reading no config; the same name under another owner stays refused."""
    from visionft import cli
    from visionft.checkpoints import stored_timm_name

    assert stored_timm_name({"timm_name": "hf-hub:timm/resnet18.a1_in1k"}, "x") == "resnet18.a1_in1k"
    crafted = _with_backbone_name(tiny_ckpt, "hf-hub:timm/test_resnet", tmp_path / "crafted.ckpt")
    assert cli.run("export", ["--ckpt", str(crafted), "--format", "torchscript", "--out", str(tmp_path / "x")]) == 0
    with pytest.raises(UsageError, match="is not a timm model name"):
        stored_timm_name({"timm_name": "hf-hub:someone/resnet18.a1_in1k"}, "x")


def test_a_run_from_a_local_dir_backbone_records_the_timm_name_and_exports(tmp_path, tiny_ckpt):
    """``backbone.name=local-dir:DIR`` typed by the user (DIR: a `visionft export` folder) trains from DIR's weights
    (c4a2980: 'no pretrained weights ... HF_HUB_OFFLINE is set'), its checkpoints record the timm model DIR's
    config.json describes, not the folder, and they export."""
    import json

    import torch
    from conftest import compose_cfg

    from visionft.export import export
    from visionft.train import train

    export(str(tiny_ckpt), "torchscript", str(tmp_path / "exported"))
    pre = json.loads((tmp_path / "exported" / "config.json").read_text())
    overrides = [*TINY, "data.train_size=64", "data.test_size=16", "backbone=timm",
                 f"backbone.name=local-dir:{tmp_path / 'exported'}", "backbone.pretrained=true"]
    metrics = train(compose_cfg(overrides, tmp_path / "run"))
    assert metrics["weights"] == f"local-dir:{tmp_path / 'exported' / 'model.safetensors'}"
    best = tmp_path / "run" / "checkpoints" / "best.ckpt"
    stored = torch.load(best, map_location="cpu", weights_only=True)
    assert stored["visionft"]["timm_name"] == f"{pre['architecture']}.{pre['pretrained_cfg']['tag']}"
    artifact, _ = export(str(best), "torchscript", str(tmp_path / "again"))
    assert Path(artifact).is_file()
