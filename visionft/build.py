"""From a composed config to the objects of a run: every object whose config group has a ``_target_`` is built here
with Hydra's ``instantiate``, in plain view (data, strategy, backbone, optimizer and schedule factories, callbacks,
loggers), and wired into a ``TransferModule`` and a Lightning ``Trainer``."""
from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import (
    LearningRateMonitor,
    ModelCheckpoint,
    ProgressBar,
)
from omegaconf import DictConfig, OmegaConf, open_dict

from visionft.callbacks import LogEveryEpoch, NanGuard, Preemption, ResumeState, TrainThroughput
from visionft.checkpoints import AtomicCheckpointIO
from visionft.errors import UsageError
from visionft.loggers import ResumableCSVLogger
from visionft.module import TrainOptions, TransferModule
from visionft.weights import resolve as resolve_weights

log = logging.getLogger(__name__)
# loggers whose library is an optional extra of visionft
EXTRAS = {"mlflow": "mlflow", "wandb": "wandb"}
# CPU instructions that compute in bfloat16 (torch.cpu.get_capabilities): x86 AVX512-BF16, AMX, AVX10; ARM BF16
BF16_CPU = ("avx512_bf16", "amx_bf16", "avx10_1", "bf16", "sve_bf16")


def auto_precision() -> str:
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"


def warn_emulated_bf16(trainer: L.Trainer) -> None:
    """One line when a bf16 precision runs on a CPU that has no bfloat16 instructions: torch then emulates it,
    several times slower than float32."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if "bf16" not in str(trainer.precision) or not isinstance(trainer.accelerator, CPUAccelerator) or not capabilities:
        return
    caps = capabilities()
    if not any(caps.get(k) for k in BF16_CPU):
        log.warning("trainer.precision=%s: this CPU (%s) has no bfloat16 instructions (torch.cpu.get_capabilities() "
                    "lists none of %s), so bf16 runs emulated, several times slower than float32: use "
                    "trainer.precision=32-true",
                    trainer.precision, caps.get("cpu_name") or caps.get("architecture", "?"), ", ".join(BF16_CPU))


def class_weights(spec, counts: np.ndarray) -> list[float] | None:
    if spec is None:
        return None
    if spec == "balanced":
        return (counts.sum() / (len(counts) * np.maximum(counts, 1))).tolist()
    if len(spec) != len(counts):
        raise UsageError(f"loss.class_weights has {len(spec)} values for {len(counts)} classes")
    return [float(w) for w in spec]


def build(cfg: DictConfig):
    """Data, backbone, strategy and module from the config (no Trainer): for tests and tools. Missing pretrained
    weights are found before the data is read (scanning a folder can take minutes)."""
    strategy = instantiate(cfg.strategy)
    checkpoint = cfg.backbone.get("checkpoint")
    if checkpoint and not strategy.uses_pretrained:
        raise UsageError(f"strategy={strategy.name.lower()} trains from random init, but "
                         f"backbone.checkpoint={checkpoint} is set: drop backbone.checkpoint, "
                         "or fine-tune it with strategy=full")
    if cfg.backbone.pretrained and strategy.uses_pretrained and not checkpoint and cfg.backbone.get("name"):
        resolve_weights(cfg.backbone.name)  # WeightsUnavailable (offline, none cached) in seconds
    dm = instantiate(cfg.data)
    make_backbone = instantiate(cfg.backbone, _convert_="all")
    backbone = make_backbone(num_classes=dm.num_classes,
                             pretrained=bool(cfg.backbone.pretrained) and strategy.uses_pretrained,
                             image_size=cfg.data.get("image_size") or cfg.backbone.get("image_size"))
    dc = backbone.data_config
    dm.configure(dc["input_size"][-1], dc["interpolation"], dc["crop_pct"])
    adapted = strategy.prepare(backbone.model, backbone)
    options = TrainOptions(
        label_smoothing=cfg.loss.label_smoothing, mixup=cfg.loss.mixup, cutmix=cfg.loss.cutmix,
        class_weights=class_weights(cfg.loss.class_weights, dm.class_counts()), channels_last=bool(cfg.channels_last),
    )
    module = TransferModule(adapted, backbone, strategy, dm.num_classes, options,
                            hparams=OmegaConf.to_container(cfg, resolve=True), classes=dm.classes,
                            geometry=dm.eval_geometry(), optimizer=instantiate(cfg.optimizer, _convert_="all"),
                            schedule=instantiate(cfg.scheduler, _convert_="all"))
    return dm, backbone, module


def instantiate_entries(node: DictConfig | None, group: str) -> list:
    """Every entry of a group node that has a ``_target_`` (others, e.g. ``monitor``, are settings)."""
    out = []
    for name, entry in (node or {}).items():
        if isinstance(entry, DictConfig) and "_target_" in entry:
            try:
                out.append(instantiate(entry, _convert_="all"))
            except InstantiationException as e:
                missing = isinstance(e.__cause__, (ImportError, ModuleNotFoundError))
                if missing and name in EXTRAS:
                    raise UsageError(f"{group}={name} needs its library: "
                                     f"pip install \"visionft[{EXTRAS[name]}]\"") from e
                raise
    return out


def build_trainer(cfg: DictConfig, out: Path) -> tuple[L.Trainer, ModelCheckpoint, TrainThroughput]:
    """The Trainer with the configured callbacks and loggers, plus visionft's throughput meter, NaN guard,
    preemption handler and atomic checkpoint writer.
    Returns it with the monitored ("best") checkpoint callback and the throughput meter."""
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    if kwargs.get("precision") == "auto":
        kwargs["precision"] = auto_precision()
    kwargs = {"enable_model_summary": False, **{k: v for k, v in kwargs.items() if v is not None}}
    speed = TrainThroughput()
    if "monitor" in cfg.callbacks:  # callbacks.mode null: min for a loss, max otherwise
        with open_dict(cfg):
            cfg.callbacks.mode = cfg.callbacks.get("mode") or ("min" if "loss" in str(cfg.callbacks.monitor) else "max")
    loggers = instantiate_entries(cfg.get("logger"), "logger")
    callbacks = [c for c in instantiate_entries(cfg.callbacks, "callbacks")  # progress bar, LR monitor: if wanted
                 if (kwargs.get("enable_progress_bar", True) or not isinstance(c, ProgressBar))
                 and (loggers or not isinstance(c, LearningRateMonitor))]
    best = next((c for c in callbacks if isinstance(c, ModelCheckpoint) and c.monitor), None)
    for lg in loggers:  # a resumed run continues its CSV history
        if isinstance(lg, ResumableCSVLogger):
            lg.append = bool(cfg.resume or cfg.ckpt_path)
    trainer = L.Trainer(default_root_dir=out, callbacks=[*callbacks, speed, NanGuard(), Preemption(), ResumeState(),
                                                        LogEveryEpoch()],
                        logger=loggers or False, deterministic=bool(cfg.deterministic),
                        plugins=[AtomicCheckpointIO(), *kwargs.pop("plugins", [])], **kwargs)
    warn_emulated_bf16(trainer)
    return trainer, best, speed
