"""TransferModule: one LightningModule for every strategy. It normalizes uint8 batches on device, computes the
loss and torchmetrics, builds param groups and the schedule from the strategy's answers, and enforces which depth
groups are open (updates, BatchNorm mode) at each epoch. It never asks which strategy it runs."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from visionft.backbones import Backbone
from visionft.optim import build_param_groups, group_table, lr_lambdas, param_depths, plain_name, warmup_cosine
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


def make_metrics(num_classes: int, prefix: str) -> MetricCollection:
    metrics = {
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        "f1_macro": MulticlassF1Score(num_classes, average="macro"),
    }
    if num_classes > 5:
        metrics["top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return MetricCollection(metrics, prefix=prefix)


def checkpoint_meta(backbone: Backbone, num_classes: int, classes: list[str] | None) -> dict:
    """What export and inference need, saved in every checkpoint (plain types: checkpoints load weights-only)."""
    dc = backbone.data_config
    return {
        "timm_name": backbone.name, "num_classes": num_classes,
        "classes": list(classes or [str(i) for i in range(num_classes)]),
        "image_size": int(dc["input_size"][-1]), "interpolation": dc["interpolation"],
        "mean": [float(v) for v in dc["mean"]], "std": [float(v) for v in dc["std"]],
        "crop_pct": float(dc.get("crop_pct", 1.0)), "model_kwargs": dict(backbone.model_kwargs),
    }


class TransferModule(L.LightningModule):
    def __init__(self, model: nn.Module, backbone: Backbone, strategy: Strategy, num_classes: int,
                 options: TrainOptions | None = None, hparams: dict | None = None,
                 classes: list[str] | None = None) -> None:
        super().__init__()
        self.meta = checkpoint_meta(backbone, num_classes, classes)
        self.save_hyperparameters(hparams or {})  # plain containers only: checkpoints load weights-only
        self.model, self.strategy, self.options = model, strategy, options or TrainOptions()
        self.group_names = [g.name for g in backbone.groups]
        self.n_groups = len(backbone.groups)
        strategy.validate(self.n_groups)
        self.depths = param_depths(model, backbone)
        self.bn_modules = [(m, backbone.bn_groups[plain_name(name)]) for name, m in model.named_modules()
                           if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self._freeze_never_open()
        self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}
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
        self._open_state: tuple | None = None
        if self.options.channels_last:
            self.model.to(memory_format=torch.channels_last)

    # -- groups ---------------------------------------------------------------------------------------------
    def _freeze_never_open(self) -> None:
        for name, p in self.model.named_parameters():
            if self.strategy.open_epoch(self.depths[name], self.n_groups) is None:
                p.requires_grad_(False)

    def is_open(self, depth: int, epoch: int) -> bool:
        return self.strategy.is_open(depth, self.n_groups, epoch)

    def _epoch(self) -> int:
        return self.trainer.current_epoch if self._trainer is not None else 0

    def apply_bn_policy(self, epoch: int | None = None) -> None:
        epoch = self._epoch() if epoch is None else epoch
        for m, depth in self.bn_modules:
            m.train(self.training and self.strategy.bn_trains(depth, self.n_groups, epoch))

    def apply_gates(self, epoch: int) -> None:
        """Open the groups due at ``epoch``. On one device, closed groups are hard-frozen (no backward compute);
        under DDP every trainable parameter keeps requires_grad (the reducer is built once) and
        ``on_before_optimizer_step`` drops closed groups' gradients instead."""
        # Only a single-device strategy may toggle requires_grad mid-run: a DDP reducer (even of one process) is
        # built once and fails when a parameter it tracks stops receiving gradients.
        single = isinstance(self.trainer.strategy, SingleDeviceStrategy)
        if single:
            for name, p in self.model.named_parameters():
                if name in self.trainable:
                    p.requires_grad_(self.is_open(self.depths[name], epoch))
        self.apply_bn_policy(epoch)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            self.apply_bn_policy()
        return self

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
            loss = torch.sum(-soft * F.log_softmax(logits, dim=-1), dim=-1).mean()
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
        groups = build_param_groups(self.model, self.depths, self.group_names,
                                    lambda depth, name: s.lr_scale(depth, self.n_groups, name),
                                    o.weight_decay, no_decay)
        if not groups:
            raise ValueError(f"strategy {s.name} leaves no parameter to train")
        on_cuda = next(self.model.parameters()).is_cuda
        opt = torch.optim.AdamW(groups, lr=s.lr, betas=tuple(o.betas), fused=on_cuda or None)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        steps_per_epoch = max(1, total // max(1, self.trainer.max_epochs or 1))
        warmup = int(round(o.warmup_epochs * steps_per_epoch))
        schedule = lambda t: warmup_cosine(t, total, warmup, o.min_lr_ratio)  # noqa: E731
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambdas(groups, self.is_open, steps_per_epoch, schedule))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_epoch_start(self) -> None:
        epoch = self.current_epoch
        self.apply_gates(epoch)
        state = tuple(self.is_open(d, epoch) for d in range(self.n_groups))
        if state != self._open_state:
            self._open_state = state
            rank_zero_info(f"param groups at epoch {epoch} ({self.strategy.name}):\n"
                           + group_table(self.param_group_rows()))

    def on_before_optimizer_step(self, optimizer) -> None:
        epoch = self.current_epoch
        for g in optimizer.param_groups:
            if not self.is_open(g["depth"], epoch):
                for p in g["params"]:
                    p.grad = None  # closed: no update, no decay, no Adam state, not clipped

    def param_group_rows(self) -> list[dict]:
        """What the optimizer holds now, per param group, plus depth groups frozen for the whole run."""
        epoch = self._epoch()
        bn = {}
        for m, depth in self.bn_modules:
            bn.setdefault(depth, "train" if self.strategy.bn_trains(depth, self.n_groups, epoch) else "eval")
        opt = self.optimizers(use_pl_optimizer=False) if self._trainer is not None else None
        groups = opt.param_groups if opt is not None else []
        rows, seen = [], set()
        for g in groups:
            seen.add(g["depth"])
            rows.append(self._row(g["name"], g["depth"], g["params"], g["lr"], g["weight_decay"], epoch, bn))
        for depth in range(self.n_groups):
            if depth not in seen:
                params = [p for n, p in self.model.named_parameters() if self.depths[n] == depth]
                rows.append(self._row(self.group_names[depth], depth, params, 0.0, 0.0, epoch, bn, frozen=True))
        return sorted(rows, key=lambda r: r["depth"])

    def _row(self, name, depth, params, lr, wd, epoch, bn, frozen=False) -> dict:
        return {"group": name, "depth": depth, "tensors": len(params), "params": sum(p.numel() for p in params),
                "lr": float(lr), "weight_decay": float(wd),
                "trainable": (not frozen) and self.is_open(depth, epoch), "bn": bn.get(depth, "-")}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["visionft"] = self.meta

    def param_counts(self) -> dict[str, int]:
        """Trainable (updated at some point in the run) and total parameters; peft's frozen copy of a
        ``modules_to_save`` head is not counted twice."""
        named = [(n, p) for n, p in self.model.named_parameters() if ".original_module." not in n]
        return {"trainable_params": sum(p.numel() for n, p in named if n in self.trainable),
                "total_params": sum(p.numel() for _, p in named)}
