"""TransferModule: one LightningModule for every strategy. It normalizes uint8 batches on device, computes the
loss and torchmetrics, builds param groups and the schedule from the strategy's answers, and enforces which depth
groups are open (updates, BatchNorm mode) at each epoch. It never asks which strategy it runs."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from visionft.backbones import Backbone
from visionft.gates import Gates, GroupGates
from visionft.optim import build_param_groups, lr_lambdas, param_depths, plain_name, warmup_cosine
from visionft.strategies import Strategy

log = logging.getLogger(__name__)


@dataclass
class TrainOptions:
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    label_smoothing: float = 0.0
    mixup: float = 0.0  # mixup alpha (timm Mixup); 0 = off
    cutmix: float = 0.0  # cutmix alpha; 0 = off
    class_weights: list[float] | None = None
    channels_last: bool = False


def training_horizon(trainer) -> tuple[int, int]:
    """(optimizer steps in the run, optimizer steps per epoch), from the real number of training batches per epoch
    (after ``limit_train_batches``) and gradient accumulation; ``max_steps`` may end the run before the last epoch."""
    total = trainer.estimated_stepping_batches
    if not math.isfinite(total):
        raise ValueError("trainer.max_epochs=-1 with no trainer.max_steps trains forever, but the LR schedule needs an "
                         "end: set trainer.max_epochs=N or trainer.max_steps=N")
    if trainer.train_dataloader is None:  # max_epochs=-1 + max_steps: Lightning did not load the data to estimate
        trainer.fit_loop.setup_data()
    batches = trainer.num_training_batches
    per_epoch = math.ceil(batches / trainer.accumulate_grad_batches) if math.isfinite(batches) else int(total)
    return max(1, int(total)), max(1, per_epoch)


def soft_cross_entropy(logits: torch.Tensor, soft: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy with soft targets (mixup/cutmix; timm's Mixup already applied label smoothing). With class
    weights, class c's term is weighted by w_c and the batch is normalized by the total target weight, the same
    weighted mean ``F.cross_entropy(weight=...)`` takes over hard labels, so mixed and plain batches step alike."""
    logp = F.log_softmax(logits, dim=-1)
    if weight is None:
        return -(soft * logp).sum(-1).mean()
    return -(soft * weight * logp).sum() / (soft @ weight).sum()


def make_metrics(num_classes: int, prefix: str) -> MetricCollection:
    metrics = {
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        "f1_macro": MulticlassF1Score(num_classes, average="macro"),
    }
    if num_classes > 5:
        metrics["top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return MetricCollection(metrics, prefix=prefix)


def checkpoint_meta(backbone: Backbone, num_classes: int, classes: list[str] | None, geometry: dict | None = None) -> dict:
    """What export and inference need, saved in every checkpoint (plain types: checkpoints load weights-only).
    ``geometry`` is the evaluation geometry the datamodule really used (size, interpolation, crop), so that
    inference preprocesses exactly as evaluation did; without it, the backbone's pretrained config."""
    dc = backbone.data_config
    geometry = {"image_size": int(dc["input_size"][-1]), "interpolation": dc["interpolation"],
                "crop_pct": float(dc.get("crop_pct", 1.0)), **(geometry or {})}
    return {
        "timm_name": backbone.name, "num_classes": num_classes,
        "classes": list(classes or [str(i) for i in range(num_classes)]),
        "image_size": int(geometry["image_size"]), "interpolation": str(geometry["interpolation"]),
        "mean": [float(v) for v in dc["mean"]], "std": [float(v) for v in dc["std"]],
        "crop_pct": float(geometry["crop_pct"]), "model_kwargs": dict(backbone.model_kwargs),
    }


class TransferModule(L.LightningModule):
    def __init__(self, model: nn.Module, backbone: Backbone, strategy: Strategy, num_classes: int,
                 options: TrainOptions | None = None, hparams: dict | None = None,
                 classes: list[str] | None = None, geometry: dict | None = None) -> None:
        super().__init__()
        self.meta = checkpoint_meta(backbone, num_classes, classes, geometry)
        self.save_hyperparameters(hparams or {})  # plain containers only: checkpoints load weights-only
        self.model, self.strategy, self.options = model, strategy, options or TrainOptions()
        self.group_names = [g.name for g in backbone.groups]
        strategy.validate(len(backbone.groups))
        bn_depths = {name: backbone.bn_groups[plain_name(name)] for name, m in model.named_modules()
                     if isinstance(m, nn.modules.batchnorm._BatchNorm)}
        self.gates = Gates(strategy, len(backbone.groups), param_depths(model, backbone), bn_depths)
        self.gates.freeze_never_open(model)
        mean, std = backbone.data_config["mean"], backbone.data_config["std"]
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) * 255, persistent=False)
        self.train_metrics = MetricCollection({"acc": MulticlassAccuracy(num_classes, average="micro")},
                                              prefix="train/")
        self.val_metrics = make_metrics(num_classes, "val/")
        self.test_metrics = make_metrics(num_classes, "test/")
        self.mixup = self._make_mixup(num_classes)
        weights = self.options.class_weights
        self.register_buffer("class_weights", torch.tensor(weights, dtype=torch.float) if weights else None,
                             persistent=False)
        if self.options.channels_last:
            self.model.to(memory_format=torch.channels_last)

    # -- forward / steps ------------------------------------------------------------------------------------
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() if x.dtype == torch.uint8 else x * 255.0
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.options.channels_last else x

    def use_compiled(self, fn) -> None:
        """Run the model through ``fn`` (a torch.compile of ``self.model``) or, with None, eagerly. Kept out of the
        module tree so parameter names, state_dict keys and depth groups stay those of ``self.model``."""
        self.__dict__["_compiled"] = fn

    def net(self, x: torch.Tensor) -> torch.Tensor:
        compiled = self.__dict__.get("_compiled")
        return self.model(x) if compiled is None else compiled(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))

    def _make_mixup(self, num_classes: int):
        o = self.options
        if not (o.mixup or o.cutmix):
            return None
        from timm.data import Mixup

        return Mixup(mixup_alpha=o.mixup, cutmix_alpha=o.cutmix, label_smoothing=o.label_smoothing,
                     num_classes=num_classes)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.mixup is not None and x.shape[0] % 2 == 0:
            x, soft = self.mixup(self.normalize(x), y)
            logits = self.net(x)
            loss = soft_cross_entropy(logits, soft, self.class_weights)
        else:
            logits = self(x)
            loss = F.cross_entropy(logits, y, weight=self.class_weights,
                                   label_smoothing=self.options.label_smoothing)
        self.train_metrics.update(logits.detach(), y)
        # epoch-level logging only: no per-step host sync
        self.log("train/loss", loss.detach(), on_step=False, on_epoch=True, batch_size=x.shape[0])
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True)
        return loss

    def _eval_step(self, batch, metrics: MetricCollection, stage: str):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        metrics.update(logits, y)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, batch_size=x.shape[0])
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage == "val")

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, self.test_metrics, "test")

    def predict_step(self, batch, batch_idx):
        return self(batch[0] if isinstance(batch, (tuple, list)) else batch).softmax(-1)

    # -- optimizer, schedule, gates --------------------------------------------------------------------------
    def configure_optimizers(self):
        s, o = self.strategy, self.options
        no_decay = self.model.no_weight_decay() if hasattr(self.model, "no_weight_decay") else ()
        gates = self.gates
        groups = build_param_groups(self.model, gates.depths, self.group_names,
                                    lambda depth, name: s.lr_scale(depth, gates.n_groups, name),
                                    o.weight_decay, no_decay)
        if not groups:
            raise ValueError(f"strategy {s.name} leaves no parameter to train")
        on_cuda = next(self.model.parameters()).is_cuda
        opt = torch.optim.AdamW(groups, lr=s.lr, betas=tuple(o.betas), fused=on_cuda or None)
        total, steps_per_epoch = training_horizon(self.trainer)
        warmup = int(round(o.warmup_epochs * steps_per_epoch))
        schedule = lambda t: warmup_cosine(t, total, warmup, o.min_lr_ratio)  # noqa: E731
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambdas(groups, gates.is_open, steps_per_epoch, schedule))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_callbacks(self):
        """The gates travel with the module, so any Trainer enforces them (once, across fit/validate/test)."""
        return [] if any(isinstance(c, GroupGates) for c in self.trainer.callbacks) else [GroupGates()]

    def param_group_rows(self) -> list[dict]:
        opt = self.optimizers(use_pl_optimizer=False) if self._trainer is not None else None
        epoch = self.trainer.current_epoch if self._trainer is not None else 0
        return self.gates.rows(self.model, opt, self.group_names, epoch)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["visionft"] = self.meta

    def param_counts(self) -> dict[str, int]:
        """Parameters that trained in the run (in the epochs it entered: a group that gradual unfreezing would open
        after the last epoch, or after early stopping, is not counted; before any fit, epoch 0) and all parameters; peft's frozen copy of a ``modules_to_save`` head is not counted twice."""
        copy = lambda name: ".original_module." in name  # noqa: E731
        return {"trainable_params": self.gates.trained_params(self.model, skip=copy),
                "total_params": sum(p.numel() for n, p in self.model.named_parameters() if not copy(n))}
