"""TransferModule: one LightningModule for every strategy: forward (uint8 batches normalized on device), loss,
torchmetrics, and the optimizer and schedule built from the strategy's answers (``visionft.optim``). Which groups
train when, and BatchNorm modes, live in ``visionft.gates``; what a wrapper added, in ``visionft.adapted``. It never
asks which strategy it runs."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from visionft.adapted import Adapted
from visionft.backbones import Backbone
from visionft.checkpoints import DATA_KEY
from visionft.errors import UsageError
from visionft.gates import Gates, GroupGates
from visionft.metrics import make_metrics
from visionft.optim import (
    Clock,
    build_param_groups,
    lr_lambdas,
    make_optimizer,
    training_horizon,
    weight_decay_of,
)
from visionft.schedules import WarmupCosine
from visionft.strategies import Strategy

log = logging.getLogger(__name__)


@dataclass
class TrainOptions:
    """Loss and memory-format options (the optimizer and the schedule come from their own config groups)."""

    label_smoothing: float = 0.0
    mixup: float = 0.0  # mixup alpha (timm Mixup); 0 = off
    cutmix: float = 0.0  # cutmix alpha; 0 = off
    class_weights: list[float] | None = None
    channels_last: bool = False


def soft_cross_entropy(logits: torch.Tensor, soft: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy with soft targets (mixup/cutmix; timm's Mixup already applied label smoothing). With class
    weights, class c's term is weighted by w_c and the batch is normalized by the total target weight, the same
    weighted mean ``F.cross_entropy(weight=...)`` takes over hard labels, so mixed and plain batches step alike."""
    logp = F.log_softmax(logits, dim=-1)
    if weight is None:
        return -(soft * logp).sum(-1).mean()
    return -(soft * weight * logp).sum() / (soft @ weight).sum()


def checkpoint_meta(backbone: Backbone, num_classes: int, classes: list[str] | None,
                    geometry: dict | None = None) -> dict:
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
    def __init__(self, adapted: Adapted, backbone: Backbone, strategy: Strategy, num_classes: int,
                 options: TrainOptions | None = None, hparams: dict | None = None,
                 classes: list[str] | None = None, geometry: dict | None = None,
                 optimizer: Callable | None = None, schedule: Callable | None = None) -> None:
        super().__init__()
        self.meta = checkpoint_meta(backbone, num_classes, classes, geometry)
        self.data_fingerprint: dict | None = None  # the datamodule's fingerprint(): saved in every checkpoint
        self.save_hyperparameters(hparams or {})  # plain containers only: checkpoints load weights-only
        self.model, self.strategy, self.options = adapted.model, strategy, options or TrainOptions()
        self.adapted = adapted
        self.optimizer_factory = optimizer or partial(torch.optim.AdamW, weight_decay=0.05)
        self.schedule = schedule or WarmupCosine()
        self.group_names = [g.name for g in backbone.groups]
        strategy.validate(len(backbone.groups))
        self.gates = Gates(strategy, len(backbone.groups), adapted.depths(), adapted.bn_depths())
        self.gates.freeze_never_open(self.model, adapted.trainable)
        mean, std = backbone.data_config["mean"], backbone.data_config["std"]
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) * 255, persistent=False)
        # labels are the datamodule's (checked there): no per-step argument validation, which syncs with the device
        self.train_metrics = MetricCollection({"acc": MulticlassAccuracy(num_classes, average="micro",
                                                                         validate_args=False)}, prefix="train/")
        self._loss_sum, self._loss_n = torch.zeros(()), 0
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
        # epoch-level training metrics, accumulated on the device and logged once per epoch: no per-step host sync,
        # and none of Lightning's per-call logging work (≈ 1.7 ms a step on CPU, measured with cProfile)
        self.train_metrics.update(logits.detach(), y)
        n = x.shape[0]
        self._loss_sum, self._loss_n = self._loss_sum + loss.detach().float() * n, self._loss_n + n
        return loss

    def on_train_batch_start(self, batch, batch_idx) -> None:
        """Gradients freed before the forward (PyTorch's own order; Lightning frees them between the forward and the
        backward): the forward's activations reuse their memory, so the peak is lower by their size, and on CPU the
        allocator skips a round trip to the OS (ResNet-18 at 32 px, partial: 5-8% a step). Same steps, same weights:
        the first batch of each accumulation window starts from no gradients, as in Lightning's loop."""
        if batch_idx % self.trainer.accumulate_grad_batches == 0:
            for opt in self.trainer.optimizers:
                opt.zero_grad(set_to_none=True)

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer) -> None:
        pass  # done before the forward (on_train_batch_start)

    def on_train_epoch_start(self) -> None:
        self._loss_sum, self._loss_n = torch.zeros((), device=self.device), 0
        self.train_metrics.reset()

    def on_train_epoch_end(self) -> None:
        if self._loss_n:  # the batch-size-weighted mean loss and the accuracy of this epoch's steps (this process's)
            self.log("train/loss", self._loss_sum / self._loss_n)
            self.log_dict(self.train_metrics.compute())

    def _eval_step(self, batch, metrics: MetricCollection, stage: str):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        metrics.update(logits, y)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, batch_size=x.shape[0])
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage == "val")
        return logits  # for callbacks (the report's test predictions); Lightning keeps nothing of it

    def validation_step(self, batch, batch_idx):
        return self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch, batch_idx):
        return self._eval_step(batch, self.test_metrics, "test")

    # -- optimizer, schedule, gates --------------------------------------------------------------------------
    def configure_optimizers(self):
        s, gates, adapted = self.strategy, self.gates, self.adapted
        plain = adapted.backbone.model
        no_decay = set(plain.no_weight_decay()) if hasattr(plain, "no_weight_decay") else set()
        groups = build_param_groups(self.model, gates.depths, self.group_names,
                                    lambda depth, name: s.lr_scale(depth, gates.n_groups, name),
                                    weight_decay_of(self.optimizer_factory),
                                    no_decay=lambda name: adapted.plain_name(name) in no_decay)
        if not groups:
            raise UsageError(f"strategy {s.name} leaves no parameter to train")
        opt = make_optimizer(self.optimizer_factory, groups, s.lr, next(self.model.parameters()).is_cuda)
        total, steps_per_epoch = training_horizon(self.trainer)
        self.clock = clock = Clock(steps_per_epoch, total, tuple(s.phase_starts(gates.n_groups)))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambdas(groups, gates.is_open, clock, self.schedule))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def epoch_now(self) -> int:
        """The epoch on the schedule's clock (optimizer steps so far), which the open set and the LR both read."""
        clock = getattr(self, "clock", None)
        return clock.epoch(self.trainer.global_step) if clock is not None else self.trainer.current_epoch

    def configure_callbacks(self):
        """The gates travel with the module, so any Trainer enforces them (once, across fit/validate/test)."""
        return [] if any(isinstance(c, GroupGates) for c in self.trainer.callbacks) else [GroupGates()]

    def param_group_rows(self) -> list[dict]:
        opt = self.optimizers(use_pl_optimizer=False) if self._trainer is not None else None
        epoch = self.epoch_now() if self._trainer is not None else 0
        return self.gates.rows(self.model, opt, self.group_names, epoch)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["visionft"] = self.meta
        if self.data_fingerprint is not None:  # what a resume compares its data with
            checkpoint[DATA_KEY] = self.data_fingerprint

    def param_counts(self) -> dict[str, int]:
        """Parameters that trained in the run (in the epochs it entered: a group that gradual unfreezing would open
        after the last epoch, or after early stopping, is not counted; before any fit, epoch 0) and all parameters;
        a frozen copy a wrapper keeps of a parameter (e.g. the original of a head it trains a copy of) is not counted
        twice."""
        dup = self.adapted.duplicate
        return {"trainable_params": self.gates.trained_params(self.model, skip=dup),
                "total_params": sum(self.adapted.numel(n, p) for n, p in self.model.named_parameters() if not dup(n))}
