"""Gradual unfreezing stays correct across a resume and under 2-process DDP (CPU, gloo)."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from visionft.train import build, build_trainer, train

GRADUAL = ["backbone.name=test_resnet", "+backbone.kwargs.zero_init_last=false", "strategy=gradual_unfreeze",
           "trainer.limit_train_batches=3", "trainer.limit_val_batches=1"]


class OnResume(L.Callback):
    """What the optimizer and the gates look like at the first resumed epoch."""

    def on_before_backward(self, trainer, module, loss):  # after the gates of this batch were applied
        if not hasattr(self, "epoch"):  # (Lightning re-enters the finished epoch 1 first, with no batches)
            self.epoch = trainer.current_epoch
            opt = trainer.optimizers[0]
            self.state = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in module.model.named_parameters()
                          if p in opt.state}
            self.open = [module.gates.is_open(d, trainer.current_epoch) for d in range(module.gates.n_groups)]
            self.requires_grad = {n for n, p in module.model.named_parameters() if p.requires_grad}


def test_resume_mid_schedule_keeps_unfrozen_groups_and_their_optimizer_state(tiny_cfg, tmp_path):
    out = tmp_path / "gradual"
    train(tiny_cfg(*GRADUAL, "trainer.max_epochs=2", output_dir=out))  # epochs 0 (head), 1 (+block4)
    saved = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    cfg = tiny_cfg(*GRADUAL, "trainer.max_epochs=4", "resume=true", output_dir=out)
    dm, backbone, module = build(cfg)
    trainer, _, _ = build_trainer(cfg, out)
    probe = OnResume()
    trainer.callbacks.append(probe)
    trainer.fit(module, datamodule=dm, ckpt_path=str(out / "checkpoints" / "last.ckpt"))
    assert probe.epoch == 2
    assert probe.open == [False, False, False, True, True, True]  # head, block4 and now block3
    block4 = {n for n in probe.requires_grad if module.gates.depths[n] == 4}
    assert block4 and block4 <= probe.requires_grad
    assert not any(module.gates.depths[n] < 3 for n in probe.requires_grad)
    # the Adam state of the head and block4 came back from the checkpoint, exactly; block3 starts fresh
    saved_state = saved["optimizer_states"][0]["state"]
    steps = sorted({int(s["step"]) for s in saved_state.values()})
    assert steps == [3, 6]  # block4 trained 3 steps (epoch 1), the head 6 (epochs 0-1)
    restored = {n: int(s["step"]) for n, s in probe.state.items()}
    assert {module.gates.depths[n] for n in restored} == {4, 5}
    assert all(restored[n] == (6 if module.gates.depths[n] == 5 else 3) for n in restored)
    # and the scheduler continued from step 6: every open group's LR follows the global schedule
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 12


class DumpWeights(L.Callback):
    def __init__(self, folder: Path):
        self.folder = folder

    def on_train_epoch_end(self, trainer, module):
        state = {k: v.detach().cpu().clone() for k, v in module.model.state_dict().items()}
        torch.save(state, self.folder / f"rank{trainer.global_rank}_epoch{trainer.current_epoch}.pt")


@pytest.mark.slow
def test_ddp_two_processes_stay_identical_across_an_unfreeze(tiny_cfg, tmp_path):
    cfg = tiny_cfg(*GRADUAL, "trainer=cpu_ddp", "trainer.devices=2", "trainer.enable_progress_bar=false",
                   "trainer.max_epochs=3", "trainer.log_every_n_steps=1", output_dir=tmp_path / "ddp")
    dm, backbone, module = build(cfg)
    trainer, _, _ = build_trainer(cfg, tmp_path / "ddp")
    trainer.callbacks.append(DumpWeights(tmp_path))
    trainer.fit(module, datamodule=dm)
    block4 = [n for n in backbone.groups[4].params]
    prev = None
    for epoch in range(3):
        r0 = torch.load(tmp_path / f"rank0_epoch{epoch}.pt", weights_only=True)
        r1 = torch.load(tmp_path / f"rank1_epoch{epoch}.pt", weights_only=True)
        assert r0.keys() == r1.keys()
        for k in r0:
            assert torch.equal(r0[k], r1[k]), (epoch, k)
        if prev is not None:  # block4 is closed in epoch 0 and opens in epoch 1: it moves only from then on
            moved = any(not torch.equal(prev[n], r0[n]) for n in block4)
            assert moved is (epoch >= 1), epoch
        prev = r0
    stem = backbone.groups[0].params
    first = torch.load(tmp_path / "rank0_epoch0.pt", weights_only=True)
    assert all(torch.equal(first[n], prev[n]) for n in stem)  # never opened in 3 epochs
