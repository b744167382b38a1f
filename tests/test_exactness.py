"""Each option does exactly what it says: regressions found by a review of real runs (one test per defect)."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import compose_cfg
from omegaconf import OmegaConf

from visionft.train import build, build_trainer, train


# -- a new head starts at ln(K) -------------------------------------------------------------------------------
def _digits_batch(size: int, n: int = 64):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[:n], dtype=torch.float32).div(16)[:, None].repeat(1, 3, 1, 1)
    return F.interpolate(x, size=size, mode="bilinear").mul(255).to(torch.uint8), torch.tensor(d.target[:n])


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "test_resnet", "test_vit", "test_efficientnet"])
@pytest.mark.parametrize("k", [2, 10])
def test_a_new_head_on_pretrained_weights_starts_at_ln_k(name, k, tmp_path):
    """First-batch loss of a fresh head within 0.1 of ln(K) for every family. The real EfficientNet-Lite0 (offline
    weights) is the case that broke fine-tuning: timm's init of its classifier gave a first loss of ~7 here."""
    from safetensors.torch import save_file

    overrides = [f"backbone.name={name}", "data.image_size=64"]
    if name.startswith("test_"):  # 'pretrained' tiny weights: a 1000-class model saved to a file
        import timm

        src = timm.create_model(name, **({"img_size": 64} if "vit" in name else {}))
        save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
        overrides.append(f"backbone.checkpoint={tmp_path / 'w.safetensors'}")
    cfg = compose_cfg(["data=synthetic", f"data.num_classes={k}", *overrides], tmp_path / "run")
    _, backbone, module = build(cfg)
    x, y = _digits_batch(64)
    module.eval()
    with torch.no_grad():
        loss = F.cross_entropy(module(x), y % k).item()
    assert abs(loss - math.log(k)) < 0.1, loss


# -- the training horizon -------------------------------------------------------------------------------------
class LRs(__import__("lightning").Callback):
    def __init__(self):
        self.head = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.head[trainer.global_step] = trainer.optimizers[0].param_groups[-1]["lr"]


def _fit(tiny_cfg, *overrides):
    cfg = tiny_cfg("trainer.limit_val_batches=1", "scheduler.min_lr_ratio=0", *overrides)
    dm, _, module = build(cfg)
    trainer, _, _ = build_trainer(cfg, Path(cfg.paths.output_dir))
    rec = LRs()
    trainer.callbacks.append(rec)
    trainer.fit(module, datamodule=dm)
    return cfg, module, rec, trainer


@pytest.mark.parametrize("epochs", ["-1", "null"])
def test_max_steps_with_unbounded_epochs_schedules_by_real_epochs(tiny_cfg, epochs):
    """max_steps=25 with no epoch limit: one warmup epoch is one real epoch of optimizer steps (the train loader's
    length, 144 images / batch 16 = 9), not the whole run; then cosine to 0 at step 25."""
    from visionft.schedules import warmup_cosine

    cfg, module, rec, trainer = _fit(tiny_cfg, f"trainer.max_epochs={epochs}", "+trainer.max_steps=25")
    spe = len(trainer.datamodule.train_dataloader())
    assert trainer.global_step == 25 and spe == 9
    lr = cfg.strategy.lr
    assert rec.head[spe - 1] == pytest.approx(lr)  # warmup over after one real epoch
    for step, got in rec.head.items():
        assert got == pytest.approx(lr * warmup_cosine(step, 25, spe, 0.0), rel=1e-6), step


def test_max_steps_before_the_last_epoch_keeps_epochs_real(tiny_cfg):
    """max_epochs=8 with max_steps=15 (9 steps per epoch): warmup is one real epoch, 9 steps, not 15 // 8 = 1."""
    cfg, module, rec, _ = _fit(tiny_cfg, "trainer.max_epochs=8", "+trainer.max_steps=15")
    assert rec.head[4] == pytest.approx(cfg.strategy.lr * 5 / 9)


def test_unbounded_horizon_is_a_one_line_error(tiny_cfg):
    with pytest.raises(ValueError, match="trainer.max_steps=N"):
        _fit(tiny_cfg, "trainer.max_epochs=-1")


def test_trainable_count_is_what_opens_within_the_run(tiny_cfg, tmp_path):
    """gradual_unfreeze for 2 epochs on test_resnet trains the head and block4 only: the count is theirs."""
    cfg = tiny_cfg("strategy=gradual_unfreeze", "trainer.max_epochs=2", "trainer.limit_train_batches=2",
                   "trainer.limit_val_batches=1")
    metrics = train(cfg)
    _, backbone, _ = build(cfg)
    params = dict(backbone.model.named_parameters())
    expected = sum(params[n].numel() for g in backbone.groups[-2:] for n in g.params)
    assert metrics["trainable_params"] == expected < metrics["total_params"]


# -- EMA: one model everywhere --------------------------------------------------------------------------------
def _plain_eval(module, loader):
    """Mean cross-entropy and accuracy of ``module`` over ``loader``: a plain loop, no Lightning."""
    module.eval()
    losses, correct, n = [], 0, 0
    with torch.no_grad():
        for x, y in loader:
            logits = module(x)
            losses.append(F.cross_entropy(logits, y, reduction="sum").item())
            correct += (logits.argmax(1) == y).sum().item()
            n += len(y)
    return sum(losses) / n, correct / n


def test_ema_weights_are_what_val_test_and_the_adapter_see(tiny_cfg, tmp_path):
    out = tmp_path / "ema"
    cfg = tiny_cfg("strategy=lora", "strategy.r=2", "callbacks=[default,ema]", "callbacks.ema.decay=0.5",
                   "trainer.max_epochs=2", "strategy.lr=5e-2", output_dir=out)
    metrics = train(cfg)
    ckpt = torch.load(metrics["best_checkpoint"], map_location="cpu", weights_only=True)
    ema, raw = ckpt["state_dict"], ckpt["current_model_state"]  # Lightning's EMA callback wrote both
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)
    dm, _, module = build(cfg)
    module.load_state_dict(ema)
    dm.setup()
    for split in ("val", "test"):
        loss, acc = _plain_eval(module, getattr(dm, f"{split}_dataloader")())
        assert metrics[split][f"{split}/loss"] == pytest.approx(loss, rel=1e-5)
        assert metrics[split][f"{split}/acc"] == pytest.approx(acc)
    from safetensors.torch import load_file

    adapter = load_file(str(out / "adapter.safetensors"))
    lora_b = [k for k in adapter if "lora_B" in k]
    assert lora_b
    for k in lora_b:
        key = "model." + k.replace(".lora_B.weight", ".lora_B.default.weight")
        assert torch.equal(adapter[k], ema[key]), k


# -- loss options ---------------------------------------------------------------------------------------------
def test_mixup_weights_the_soft_target_loss_by_class(tiny_cfg):
    cfg = tiny_cfg("loss.mixup=0.4", "data.num_classes=4", "loss.class_weights=[1.0,5.0,0.5,2.0]")
    dm, _, module = build(cfg)
    dm.configure(32)
    x, y = next(iter(dm.train_dataloader()))
    torch.manual_seed(0), np.random.seed(0)
    loss = module.training_step((x, y), 0).item()
    torch.manual_seed(0), np.random.seed(0)  # the same mixing, by hand
    xm, soft = module.mixup(module.normalize(x), y)
    logp = F.log_softmax(module.model(xm), dim=-1)
    w = torch.tensor([1.0, 5.0, 0.5, 2.0])
    # the weighted mean cross_entropy(weight=w) takes over hard labels: sum_i w_yi CE_i / sum_i w_yi, with each
    # sample's target spread over classes (a mixed pair counts each class by its share)
    reference = -(soft * w * logp).sum().item() / (soft * w).sum().item()
    unweighted = -(soft * logp).sum(1).mean().item()
    assert loss == pytest.approx(reference, rel=1e-5) and abs(reference - unweighted) > 1e-3
    hard = F.one_hot(y, 4).float()  # with unmixed targets it is exactly PyTorch's weighted cross-entropy
    from visionft.module import soft_cross_entropy

    logits = module.model(module.normalize(x))
    assert soft_cross_entropy(logits, hard, w).item() == pytest.approx(F.cross_entropy(logits, y, weight=w).item(),
                                                                      rel=1e-5)


# -- checkpoint selection and the sweep objective -------------------------------------------------------------
def test_monitor_a_loss_keeps_the_lowest(tiny_cfg, tmp_path):
    out = tmp_path / "loss"
    metrics = train(tiny_cfg("callbacks.monitor=val/loss", "trainer.max_epochs=4", "strategy.lr=3e-2",
                             output_dir=out))
    rows = [r for r in csv.DictReader(open(out / "csv" / "metrics.csv")) if r.get("val/loss")]
    losses = [float(r["val/loss"]) for r in rows]
    best = torch.load(metrics["best_checkpoint"], map_location="cpu", weights_only=True)
    assert len(set(losses)) > 1
    assert best["epoch"] == int(rows[int(np.argmin(losses))]["epoch"])
    assert metrics["val"]["val/loss"] == pytest.approx(min(losses), rel=1e-5)


def test_hydra_main_returns_the_monitored_validation_metric(tiny_cfg, tmp_path):
    from visionft.__main__ import _hydra_main

    out = tmp_path / "objective"
    value = _hydra_main(tiny_cfg("callbacks.monitor=val/loss", output_dir=out))
    saved = json.loads((out / "metrics.json").read_text())
    assert value == saved["val"]["val/loss"] != saved["test"]["test/acc"]


# -- composition ----------------------------------------------------------------------------------------------
def _leaves(node, prefix=""):
    if isinstance(node, dict):
        for k, v in node.items():
            if k != "defaults":
                yield from _leaves(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], node


EXPERIMENTS = sorted(p.stem for p in
                     (Path(__import__("visionft.conf").conf.__file__).parent / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_value_an_experiment_sets_survives_composition(name, tmp_path):
    conf = Path(__import__("visionft.conf").conf.__file__).parent
    delta = OmegaConf.to_container(OmegaConf.load(conf / "experiment" / f"{name}.yaml"))
    cfg = compose_cfg([f"experiment={name}", "data.root=/x"], tmp_path)
    leaves = dict(_leaves(delta))
    assert leaves
    for key, value in leaves.items():
        if key != "data.root" and not key.startswith("hydra."):
            assert OmegaConf.select(cfg, key) == value, key
    hydra_keys = {k: v for k, v in leaves.items() if k.startswith("hydra.")}  # e.g. the sweep an experiment runs
    if hydra_keys:
        from hydra import compose, initialize_config_module

        with initialize_config_module("visionft.conf", version_base="1.3"):
            full = compose("config", overrides=[f"experiment={name}", "data.root=/x"], return_hydra_config=True)
        for key, value in hydra_keys.items():
            assert OmegaConf.select(full, key) == value, key


def test_an_experiment_overrides_every_base_value(tmp_path):
    """A user's experiment (via --config-dir) that sets keys config.yaml itself defines: its values must win."""
    from hydra import compose, initialize_config_dir

    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "probe.yaml").write_text(
        "# @package _global_\nseed: 7\nloss:\n  label_smoothing: 0.3\ncallbacks:\n  monitor: val/loss\n"
        "trainer:\n  max_epochs: 3\nstrategy:\n  lr: 0.123\n")
    conf = Path(__import__("visionft.conf").conf.__file__).parent
    with initialize_config_dir(str(conf), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=probe", f"hydra.searchpath=[file://{tmp_path}]"])
    assert (cfg.seed, cfg.loss.label_smoothing, cfg.callbacks.monitor) == (7, 0.3, "val/loss")
    assert (cfg.trainer.max_epochs, cfg.strategy.lr) == (3, 0.123)


def test_switching_augment_preset_on_the_command_line(tmp_path):
    from hydra.utils import instantiate

    from datamodules.transforms import train_transform

    for preset in ("none", "crop_flip", "shift"):
        cfg = compose_cfg(["data=digits", f"data.augment.name={preset}"], tmp_path)
        dm = instantiate(cfg.data)
        dm.configure(32)
        x, _ = dm.dataset("train")[0]
        assert x.shape == (3, 32, 32)
    with pytest.raises(ValueError, match="unknown option"):
        train_transform(32, augment={"name": "shift", "shift": {"sheer": 3}})
    with pytest.raises(ValueError, match=r"data.augment.crop_flip.<option>"):  # never silently ignored
        train_transform(32, augment={"name": "crop_flip", "zoom": 0.3})
    affine = train_transform(32, augment={"name": "shift", "shift": {"zoom": 0.3}}).transforms[1]
    assert tuple(affine.scale["x"]) == pytest.approx((0.7, 1.3))


def test_scratch_refuses_a_checkpoint(tiny_cfg, tmp_path):
    with pytest.raises(ValueError, match="random init.*backbone.checkpoint"):
        build(tiny_cfg("strategy=scratch", f"backbone.checkpoint={tmp_path / 'w.safetensors'}"))


def test_bn_frozen_holds_for_sync_batchnorm(tiny_cfg):
    """Lightning's sync_batchnorm swaps every BatchNorm for a SyncBatchNorm after the module is built; the frozen
    policy must govern the new modules (their statistics stay the pretrained ones)."""
    from lightning.pytorch.plugins import TorchSyncBatchNorm

    cfg = tiny_cfg("trainer.limit_train_batches=3", "trainer.limit_val_batches=1")
    dm, _, module = build(cfg)
    TorchSyncBatchNorm().apply(module)  # what Lightning does for trainer.sync_batchnorm=true
    bns = {n: m for n, m in module.model.named_modules() if isinstance(m, torch.nn.SyncBatchNorm)}
    assert bns
    before = {n: m.running_mean.clone() for n, m in bns.items()}
    trainer, _, _ = build_trainer(cfg, Path(cfg.paths.output_dir))
    trainer.fit(module, datamodule=dm)
    assert all(torch.equal(before[n], m.running_mean) for n, m in bns.items())
