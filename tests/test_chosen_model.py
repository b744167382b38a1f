"""The card, metrics.json and the log name the model that was shipped (its checkpoint, epoch, step and what was
trainable up to then, beside what trained over the run), and a final model whose val predictions collapse to one
class is a loud warning in the log, the card and metrics.json."""
from __future__ import annotations

import json
import logging

import lightning as L
import numpy as np
import pytest
import timm
import torch

import visionft.train as train_module
from visionft.shipped import collapse
from visionft.train import train

GRADUAL = ["strategy=gradual_unfreeze", "+backbone.kwargs.zero_init_last=false", "trainer.max_epochs=3",
           "trainer.limit_train_batches=3", "logger=csv", "callbacks.lr_monitor=null"]


class Countdown(L.Callback):
    """A val metric that only gets worse (0, -1, -2, ...): with mode=max the best checkpoint is epoch 0's."""

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            pl_module.log("val/countdown", float(-trainer.current_epoch))


def head_params(num_classes: int) -> int:
    """The classifier's parameters, counted on timm's own model (the head is all gradual unfreezing opens first)."""
    model = timm.create_model("test_resnet", pretrained=False, num_classes=num_classes)
    return sum(p.numel() for p in model.get_classifier().parameters())


def test_gradual_best_epoch_0_is_named_with_its_head_only_count(tiny_cfg, tmp_path, monkeypatch):
    build_trainer = train_module.build_trainer

    def with_countdown(cfg, out):
        trainer, ckpt, speed = build_trainer(cfg, out)
        trainer.callbacks.insert(0, Countdown())
        return trainer, ckpt, speed

    monkeypatch.setattr(train_module, "build_trainer", with_countdown)
    out = tmp_path / "run"
    m = train(tiny_cfg(*GRADUAL, "callbacks.monitor=val/countdown", "callbacks.mode=max", output_dir=out))
    stored = torch.load(out / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert stored["epoch"] == 0 and m["epochs"] == 3  # the premise: the shipped weights are epoch 0's
    on_disk = json.loads((out / "metrics.json").read_text())
    chosen, head = on_disk["chosen"], head_params(10)
    assert chosen["checkpoint"] == "checkpoints/best.ckpt" and chosen["epoch"] == 0
    assert chosen["step"] == stored["global_step"] == 3  # limit_train_batches=3: one epoch of steps
    assert chosen["trainable_params"] == head and chosen["trainable_groups"] == ["head"]
    assert chosen["trainable_pct"] == pytest.approx(100 * head / on_disk["total_params"], abs=1e-4)
    assert on_disk["trainable_params"] > head  # over the run, two body groups opened as well
    card = (out / "README.md").read_text()
    assert (f"- final model: `checkpoints/best.ckpt` (best val/countdown (max) = 0), saved at epoch 0, step 3; "
            f"trainable up to then: {head:,} of {on_disk['total_params']:,} parameters") in card
    assert f"- trained over the run: {on_disk['trainable_params']:,} of" in card


def test_last_epoch_checkpoint_counts_every_group_it_trained(tiny_cfg, tmp_path):
    out = tmp_path / "run"
    m = train(tiny_cfg(*GRADUAL, "callbacks.best=null", output_dir=out))
    stored = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    chosen = m["chosen"]
    assert chosen["checkpoint"] == "checkpoints/last.ckpt" and chosen["epoch"] == stored["epoch"] == 2
    assert chosen["step"] == stored["global_step"] == 9
    assert chosen["trainable_params"] == m["trainable_params"] > head_params(10)
    assert chosen["trainable_groups"][-1] == "head" and len(chosen["trainable_groups"]) == 3


def test_collapsed_val_predictions_warn_in_log_card_and_metrics(tiny_cfg, tmp_path, caplog):
    """Class weights 1000:1:1:1 make predicting class 0 everywhere the cheapest answer: the model collapses."""
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="visionft"):
        m = train(tiny_cfg("data.num_classes=4", "loss.class_weights=[1000,1,1,1]", "strategy.lr=1e-2",
                           "logger=none", "callbacks.lr_monitor=null", output_dir=out))
    seen = json.loads((out / "metrics.json").read_text())["val_predictions"]
    n = m["data"]["val"]
    assert seen["predicted"] == {"class_0": n, "class_1": 0, "class_2": 0, "class_3": 0}
    assert sum(seen["labels"].values()) == n
    # every image predicted class_0: torchmetrics' val accuracy is class_0's share of the val labels
    assert m["val"]["val/acc"] == pytest.approx(seen["labels"]["class_0"] / n)
    assert seen["collapsed"] is True and seen["other_classes_into_top"] == 1.0
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "collapsed to one class" in r.getMessage()]
    assert any("the final model (checkpoints/best.ckpt, epoch 0)" in r.getMessage() for r in warned)
    steps = m["data"]["train"] // 16  # data.batch_size=16: the epoch's optimizer steps
    assert any(r.getMessage().startswith(f"epoch 0 (step {steps}): val predictions collapsed") for r in warned)
    card = (out / "README.md").read_text().splitlines()
    assert card[2].startswith("> **WARNING: val predictions collapsed to one class: the final model")
    assert "'class_0' for 100.0% of the" in card[2]
    assert m["warnings"] and m["warnings"][0] in card[2]


def test_a_healthy_run_does_not_warn(tiny_cfg, tmp_path, caplog):
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="visionft"):
        m = train(tiny_cfg("data.num_classes=4", "strategy.lr=1e-2", "trainer.max_epochs=2", "logger=none",
                           "callbacks.lr_monitor=null", output_dir=out))
    seen = m["val_predictions"]
    assert m["val"]["val/acc"] >= 0.9 and seen["collapsed"] is False and m["warnings"] == []
    assert min(seen["predicted"].values()) > 0
    assert "collapsed" not in caplog.text
    assert "WARNING" not in (out / "README.md").read_text()


@pytest.mark.parametrize(("confusion", "collapsed"), [
    # the user's ants/bees run: every val image predicted ants (84 ants, 99 bees)
    ([[84, 0], [99, 0]], True),
    # the majority class of an imbalanced val set predicted everywhere: accuracy 0.9, the other class never predicted
    ([[90, 0], [10, 0]], True),
    # nearly all: 1 of 99 bees predicted as a bee
    ([[84, 0], [98, 1]], True),
    # a weak but working model: 30% of the bees predicted as ants
    ([[80, 4], [30, 69]], False),
    # one class in val: nothing to collapse from
    ([[50, 0], [0, 0]], False),
    # three classes, two of them swallowed by the third's prediction 85% of the time: below the 90% bar
    ([[40, 0, 0], [26, 4, 0], [25, 0, 5]], False),
])
def test_collapse_rule(confusion, collapsed):
    found = collapse(np.array(confusion), ["a", "b", "c"][:len(confusion)])
    assert found["collapsed"] is collapsed
    c = np.array(confusion)
    assert found["images"] == c.sum() and list(found["predicted"].values()) == c.sum(0).tolist()
