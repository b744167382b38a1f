"""Resuming mid-epoch (last.ckpt written by a mid-epoch validation) keeps the open set and BatchNorm modes of the
epoch it re-enters, at every training batch: checked against gradual unfreezing's own schedule (head + one group
per epoch) and against what actually moved."""
from __future__ import annotations

import lightning as L
import pytest
import torch

from visionft.train import build, build_trainer

GRADUAL = ["backbone.name=test_resnet", "+backbone.kwargs.zero_init_last=false", "strategy=gradual_unfreeze",
           "trainer.limit_train_batches=4", "trainer.limit_val_batches=1", "+trainer.val_check_interval=0.5"]
N_GROUPS = 6  # test_resnet: stem, block1-4, head


class Killed(RuntimeError):
    pass


class KillAt(L.Callback):
    def __init__(self, epoch: int, batch: int):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            raise Killed("simulated crash")


class Watch(L.Callback):
    """At every training batch: which parameters require grad, which BatchNorms are in train mode; per batch, which
    parameters and BatchNorm statistics changed."""

    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
        self._stats = {n: m.running_mean.clone() for n, m in _bns(module)}
        self.batches.append({"epoch": trainer.current_epoch, "batch": batch_idx})

    def on_before_backward(self, trainer, module, loss):  # the state the forward pass ran with
        self.batches[-1].update(grad={n for n, p in module.model.named_parameters() if p.requires_grad},
                                bn_train={n for n, m in _bns(module) if m.training})

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        b = self.batches[-1]
        b["moved"] = {n for n, p in module.model.named_parameters() if not torch.equal(p, self._before[n])}
        b["stats_moved"] = {n for n, m in _bns(module) if not torch.equal(m.running_mean, self._stats[n])}


def _bns(module):
    return [(n, m) for n, m in module.model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def test_mid_epoch_resume_keeps_the_open_set_and_bn_modes(tiny_cfg, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_cfg(*GRADUAL, "trainer.max_epochs=3", output_dir=out)
    dm, _, module = build(cfg)
    trainer, _, _ = build_trainer(cfg, out)
    trainer.callbacks.append(KillAt(epoch=1, batch=3))  # after epoch 1's mid-epoch validation (batch 2)
    with pytest.raises(Killed):
        trainer.fit(module, datamodule=dm)
    last = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 1 and last["global_step"] == 4 + 2  # written mid-epoch 1

    cfg = tiny_cfg(*GRADUAL, "trainer.max_epochs=3", "resume=true", output_dir=out)
    dm, backbone, module = build(cfg)
    trainer, _, _ = build_trainer(cfg, out)
    watch = Watch()
    trainer.callbacks.append(watch)
    trainer.fit(module, datamodule=dm, ckpt_path=str(out / "checkpoints" / "last.ckpt"))
    assert watch.batches[0]["epoch"] == 1 and watch.batches[0]["batch"] == 2  # re-entered mid-epoch
    depth = {n: g.index for g in backbone.groups for n in g.params}
    for b in watch.batches:
        opened = set(range(N_GROUPS - 1 - b["epoch"], N_GROUPS))  # head + one more group per epoch
        should = {n for n, d in depth.items() if d in opened}
        assert b["grad"] == should, (b["epoch"], b["batch"])
        assert b["moved"] <= should and b["moved"], (b["epoch"], b["batch"])
        assert not b["bn_train"] and not b["stats_moved"], (b["epoch"], b["batch"])  # bn=frozen, always
