"""WiSE-FT: refused where both ends are one model (the vpt prompts are kept as trained at both ends), the refusal
check against the interpolation itself, and the alpha curve drawn without touching matplotlib's global backend."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import TINY

from visionft.train import build
from visionft.wise import anchor_state, interpolate, same_at_every_alpha, snapshot

VIT = ["backbone.name=test_vit", "data.image_size=32"]


def test_vpt_with_wise_alphas_is_one_line_exit_2_before_training(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "visionft", *TINY, *VIT, "strategy=vpt", "strategy.tokens=2",
                        "wise.alphas=[0,0.5,1]", f"paths.output_dir={out}"], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-1500:]
    last = r.stderr.strip().splitlines()[-1]
    assert r.stderr.count("\n") == 1 and "wise.alphas has nothing to interpolate" in last, r.stderr[-1500:]
    assert "drop wise.alphas" in last
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())  # no epoch ran


@pytest.mark.parametrize("overrides, same", [
    (["strategy=vpt", "strategy.tokens=2"], True),
    (["strategy=vpt", "strategy.tokens=2", "strategy.deep=true"], True),
    (["strategy=lora", "strategy.r=2"], False),
    (["strategy=peft", "strategy.method=loha", "+strategy.options={r: 2}"], False),
    (["strategy=ssf"], False),
    (["strategy=adapter", "strategy.dim=4"], False),
    (["strategy=full"], False),
], ids=["vpt", "vpt_deep", "lora", "loha", "ssf", "adapter", "full"])
def test_the_refusal_agrees_with_the_interpolation(overrides, same, tiny_cfg):
    """Train-looking ends (every trainable tensor moved): theta(0) equals theta(1) exactly when the check says so."""
    _, _, module = build(tiny_cfg(*VIT, *overrides))
    start = snapshot(module.model)
    with torch.no_grad():
        for n, p in module.model.named_parameters():
            if n in module.gates.trainable:
                p.add_(torch.randn_like(p) * 0.1)
    end = snapshot(module.model)
    anchor = anchor_state(module, start, end, head_from_probe=False)
    at_zero = interpolate(anchor, end, 0.0)
    assert all(torch.equal(at_zero[k], end[k]) for k in end) is same
    assert same_at_every_alpha(module, head_from_probe=False) is same


def test_the_curve_is_drawn_without_switching_the_global_backend(tmp_path):
    code = ("import sys, matplotlib; matplotlib.use('svg'); from pathlib import Path; "
            "from visionft.wise import write_curve; "
            "write_curve([{'alpha': 0.0, 'val_acc': 0.5, 'val_loss': 1.0}, {'alpha': 1.0, 'val_acc': 0.7, "
            f"'val_loss': 0.8}}], 1.0, Path({str(tmp_path)!r})); "
            "print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-1500:]
    assert r.stdout.split() == ["svg", "False"]
    assert (tmp_path / "alpha_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("alphas, chosen, carries_base", [("[1]", 1.0, False), ("[0.5]", 0.5, True)])
def test_the_adapter_artifact_carries_base_weights_only_when_wise_moved_them(tiny_cfg, tmp_path, alphas, chosen,
                                                                           carries_base):
    """LoHa interpolates along the merged line, which moves the adapted layers' base weights for alpha < 1 only."""
    from safetensors import safe_open

    from visionft.strategies.lora import ADAPTER_FILE
    from visionft.train import train

    out = tmp_path / "run"
    m = train(tiny_cfg("strategy=peft", "strategy.method=loha", "+strategy.options={r: 2}", f"wise.alphas={alphas}",
                       output_dir=out))
    assert m["wise"]["alpha"] == chosen
    with safe_open(str(out / ADAPTER_FILE), "pt") as f:
        keys = list(f.keys())
    assert any(".hada_w" in k for k in keys)
    assert any(k.endswith(".base_layer.weight") for k in keys) is carries_base, keys
