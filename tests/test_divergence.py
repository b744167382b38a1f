"""The divergence guard judges against the loss at the start (never an epoch that already diverged), keeps no
checkpoint of a diverged epoch (training or validation loss), and its message names what is really on disk."""
from __future__ import annotations

import math
import sys

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY


def _cli(monkeypatch, capsys, *overrides) -> tuple[int, str]:
    from visionft.__main__ import main

    monkeypatch.setattr(sys, "argv", ["visionft", *TINY, *overrides])
    with pytest.raises(SystemExit) as e:
        main()
    return e.value.code, capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("lr, precision", [("1", "32-true"), ("10", "32-true"), ("1", "bf16-mixed")])
def test_a_first_epoch_that_diverges_keeps_no_checkpoint_and_says_so(tmp_path, monkeypatch, capsys, lr, precision):
    """On the tiny data, lr 1 gives a first-epoch training loss of ~6e13 (val 1e13) and lr 10 ~1e25 while staying
    finite: both are divergence against the loss at the start (about ln 10), whatever the first epoch's own mean."""
    out = tmp_path / "run"
    code, line = _cli(monkeypatch, capsys, "trainer.max_epochs=3", f"strategy.lr={lr}",
                      f"trainer.precision={precision}", f"paths.output_dir={out}")
    assert code == 2 and line.startswith("error: training diverged in epoch 0")
    assert "No checkpoint was saved: the first epoch already diverged." in line
    assert f"precision {precision}." in line
    assert ("use trainer.precision=32-true" in line) == (precision != "32-true")  # no hint when already 32-true
    assert not list(out.glob("**/*.ckpt"))  # nothing a diverged epoch wrote


class PoisonVal(L.Callback):
    """Test helper: from epoch ``epoch``'s validation on, the head gives huge (or NaN) logits; training is unharmed."""

    def __init__(self, how: str = "huge", epoch: int = 1) -> None:
        self.how, self.epoch = how, epoch

    def on_validation_start(self, trainer, module):
        if trainer.current_epoch == self.epoch and not trainer.sanity_checking:
            with torch.no_grad():
                w = module.model.get_classifier().weight
                w.fill_(float("nan")) if self.how == "nonfinite" else w.mul_(1e6).add_(1e3)


@pytest.mark.parametrize("how, why", [("huge", "validation loss "), ("nonfinite", "validation loss nan")])
def test_a_diverged_validation_saves_no_checkpoint_and_the_message_names_the_kept_one(tiny_cfg, tmp_path, how, why):
    """The guard's check after validation runs before that epoch's checkpoints (Lightning orders ModelCheckpoint
    callbacks last), so the epoch whose validation diverged writes none; the message names the file on disk."""
    from visionft.callbacks import NonFiniteLoss
    from visionft.train import train

    out = tmp_path / "run"
    cfg = tiny_cfg("trainer.max_epochs=3", "callbacks.monitor=val/loss",
                   f"+callbacks.poison._target_={__name__}.PoisonVal", f"+callbacks.poison.how={how}", output_dir=out)
    with pytest.raises(NonFiniteLoss) as e:
        train(cfg)
    message = str(e.value)
    assert message.startswith("training diverged in epoch 1") and why in message
    saved = {p.name: torch.load(p, map_location="cpu", weights_only=True) for p in (out / "checkpoints").glob("*.ckpt")}
    assert set(saved) == {"best.ckpt", "last.ckpt"} and {c["epoch"] for c in saved.values()} == {0}
    step = saved["last.ckpt"]["global_step"]
    assert f"The last checkpoint kept is {out / 'checkpoints' / 'last.ckpt'} (epoch 0, step {step})" in message


@pytest.mark.parametrize("extra", [
    ["loss.label_smoothing=0.1", "loss.mixup=0.2", "loss.cutmix=1.0", "loss.class_weights=balanced",
     "trainer.accumulate_grad_batches=2"],
    ["strategy=lp_ft", "loss.label_smoothing=0.1"],  # a probe-fitted head: its start is below ln K
])
def test_a_healthy_run_is_not_stopped(tiny_cfg, tmp_path, extra):
    from visionft.train import train

    metrics = train(tiny_cfg("trainer.max_epochs=2", *extra, output_dir=tmp_path / "run"))
    assert metrics["epochs"] == 2
    assert {p.name for p in (tmp_path / "run" / "checkpoints").glob("*.ckpt")} >= {"best.ckpt", "last.ckpt"}


def test_a_zero_head_starts_at_ln_k_with_every_loss_option():
    """Why ln K is the floor of the reference: a head that starts at zero gives exactly ln K with label smoothing,
    class weights and mixup/cutmix's soft targets alike."""
    from timm.data import Mixup

    from visionft.module import soft_cross_entropy

    k, y = 7, torch.tensor([0, 1, 2, 3, 4, 5, 6, 0])
    logits, weight = torch.zeros(8, k), torch.rand(k) + 0.1
    _, soft = Mixup(mixup_alpha=0.2, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=k)(torch.zeros(8, 3, 4, 4), y)
    for loss in (F.cross_entropy(logits, y, label_smoothing=0.1), F.cross_entropy(logits, y, weight=weight),
                 soft_cross_entropy(logits, soft, None), soft_cross_entropy(logits, soft, weight)):
        assert loss.item() == pytest.approx(math.log(k), rel=1e-6)
