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
