"""Nothing read from a checkpoint is instantiated unless it is one of visionft's own presets: crafted targets in a
checkpoint's stored config are refused in one line, with no side effect."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from visionft.train import train


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from conftest import TINY, compose_cfg

    out = tmp_path_factory.mktemp("safety")
    return train(compose_cfg(TINY, out))["best_checkpoint"]


def _crafted(ckpt, tmp_path, group: str, node: dict):
    c = torch.load(ckpt, map_location="cpu", weights_only=True)
    c["hyper_parameters"][group] = node
    path = tmp_path / f"crafted-{group}.ckpt"
    torch.save(c, path)
    return path


@pytest.mark.parametrize("group, node", [
    ("strategy", {"_target_": "builtins.open", "file": "PWNED", "mode": "w"}),
    ("strategy", {"_target_": "visionft.strategies.Full", "bn": {"_target_": "builtins.open", "file": "PWNED",
                                                                  "mode": "w"}}),
])
def test_export_refuses_a_crafted_target_without_side_effect(ckpt, tmp_path, group, node):
    pwned = tmp_path / "pwned.txt"
    node = {k: (str(pwned) if v == "PWNED" else v) for k, v in node.items()}
    if isinstance(node.get("bn"), dict):
        node["bn"] = {k: (str(pwned) if v == "PWNED" else v) for k, v in node["bn"].items()}
    bad = _crafted(ckpt, tmp_path, group, node)
    done = subprocess.run([sys.executable, "-m", "visionft", "export", "--ckpt", str(bad), "--format", "torchscript",
                           "--out", str(tmp_path / "x")], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and "refusing to instantiate" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not pwned.exists()


def test_a_crafted_data_target_is_never_instantiated(ckpt, tmp_path, caplog):
    from visionft.export import held_out_batch

    pwned = tmp_path / "pwned.txt"
    hparams = torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]
    hparams["data"] = {"_target_": "builtins.open", "file": str(pwned), "mode": "w"}
    meta = torch.load(ckpt, map_location="cpu", weights_only=True)["visionft"]
    x, source = held_out_batch(hparams, meta)
    assert "synthetic" in source and "refusing to instantiate" in caplog.text and not pwned.exists()


# The CLI with an audit hook that reports every open() of one path (sys.addaudithook: Python's own record).
_WATCHED = """import sys
watched = sys.argv.pop(1)
sys.addaudithook(lambda event, args: event == "open" and str(args[0]) == watched
                 and print("OPENED", watched, file=sys.__stdout__, flush=True))
from visionft.__main__ import main
main()
"""


def _with_model_kwargs(ckpt, tmp_path, kwargs: dict):
    c = torch.load(ckpt, map_location="cpu", weights_only=True)
    c["visionft"]["model_kwargs"] = kwargs
    path = tmp_path / "crafted-kwargs.ckpt"
    torch.save(c, path)
    return path


def test_export_refuses_a_crafted_checkpoint_path_without_opening_it(ckpt, tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"not for visionft")
    crafted = _with_model_kwargs(ckpt, tmp_path, {"checkpoint_path": str(secret)})
    done = subprocess.run([sys.executable, "-c", _WATCHED, str(secret), "export", "--ckpt", str(crafted), "--format",
                           "torchscript", "--out", str(tmp_path / "x")], capture_output=True, text=True, cwd=tmp_path)
    assert "OPENED" not in done.stdout, done.stdout
    assert done.returncode == 2, done.stderr[-1500:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "refusing to build the model" in lines[0] and "checkpoint_path=" in lines[0], lines
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("kwargs, bad", [
    ({"pretrained_cfg_overlay": {"file": "/etc/hostname"}}, "pretrained_cfg_overlay"),
    ({"drop_rate": 0.0, "cache_dir": "/tmp"}, "cache_dir"),
    ({"pretrained": True}, "pretrained"),
])
def test_export_refuses_model_kwargs_that_are_no_architecture_argument(ckpt, tmp_path, capsys, kwargs, bad):
    from visionft.cli import run

    crafted = _with_model_kwargs(ckpt, tmp_path, kwargs)
    assert run("export", ["--ckpt", str(crafted), "--format", "torchscript", "--out", str(tmp_path / "x")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "refusing to build the model" in lines[0] and f"{bad}=" in lines[0], lines
    assert "drop_rate" not in lines[0]  # an architecture argument is not named as a problem
    assert not (tmp_path / "x").exists()


def test_the_model_kwargs_visionft_writes_are_accepted():
    from visionft.backbones import create_backbone
    from visionft.module import checkpoint_meta
    from visionft.trained import checked_model_kwargs

    for name, size, kwargs in [("test_vit", 64, {"drop_path_rate": 0.1}), ("test_resnet", 48, {"drop_rate": 0.2}),
                               ("test_efficientnet", None, {"drop_path_rate": 0.1, "global_pool": "max"})]:
        meta = checkpoint_meta(create_backbone(name, 3, pretrained=False, image_size=size, kwargs=kwargs), 3, None)
        assert checked_model_kwargs(meta, "x") == meta["model_kwargs"]
        assert set(kwargs) <= set(meta["model_kwargs"]) and ("img_size" in meta["model_kwargs"]) == (name == "test_vit")


def test_a_run_trained_with_timm_build_flags_exports(tmp_path):
    from conftest import TINY, compose_cfg

    from visionft.cli import run

    flags = ["+backbone.kwargs.scriptable=true", "+backbone.kwargs.exportable=true",
             "+backbone.kwargs.pretrained_strict=false", "+backbone.kwargs.feature_cfg={flatten_sequential: true}"]
    ckpt = train(compose_cfg([*TINY, *flags], tmp_path / "run"))["best_checkpoint"]
    stored = torch.load(ckpt, map_location="cpu", weights_only=True)["visionft"]["model_kwargs"]
    assert stored == {"scriptable": True, "exportable": True, "pretrained_strict": False,
                      "feature_cfg": {"flatten_sequential": True}}
    assert run("export", ["--ckpt", str(ckpt), "--format", "torchscript", "--out", str(tmp_path / "x")]) == 0
    assert (tmp_path / "x" / "model.pt").is_file() and (tmp_path / "x" / "export_check.json").is_file()


def test_training_refuses_a_timm_loading_argument_in_one_line(tmp_path):
    from conftest import TINY

    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"not for visionft")
    done = subprocess.run([sys.executable, "-c", _WATCHED, str(secret), *TINY,
                           f"+backbone.kwargs.checkpoint_path={secret}", f"paths.output_dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert "OPENED" not in done.stdout, done.stdout
    assert done.returncode == 2, done.stderr[-1500:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "backbone.kwargs: checkpoint_path=" in lines[0] and "backbone.checkpoint" in lines[0]


@pytest.mark.parametrize("command", ["export", "embed"])
def test_an_empty_or_cut_checkpoint_is_one_line(tmp_path, capsys, command):
    """A 0-byte checkpoint (a write killed before its first byte) and one cut short: one line, exit 2, for export and
    embed alike (a 0-byte file ended in an IndexError traceback)."""
    from visionft import cli

    empty, cut = tmp_path / "empty.ckpt", tmp_path / "cut.ckpt"
    empty.write_bytes(b"")
    cut.write_bytes(b"PK\x03\x04")
    for ckpt in (empty, cut):
        argv = (["--ckpt", str(ckpt), "--format", "onnx"] if command == "export" else
                ["--ckpt", str(ckpt), "--inputs", str(tmp_path), "--out", str(tmp_path / "f.npz")])
        assert cli.run(command, argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and str(ckpt) in err[0], err
        assert ("empty file (0 bytes)" if ckpt == empty else "not a readable checkpoint") in err[0], err
