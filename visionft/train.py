"""``train(cfg)``: the whole run, wired from the composed config. Tests call it in-process."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import (EarlyStopping, EMAWeightAveraging, ModelCheckpoint, RichProgressBar,
                                         WeightAveraging)
from omegaconf import DictConfig, OmegaConf, open_dict

from visionft.backbones import create_backbone
from visionft.callbacks import NanGuard, TrainThroughput
from visionft.loggers import default_loggers
from visionft.logs import quiet_third_party
from visionft.module import TrainOptions, TransferModule

log = logging.getLogger(__name__)


def auto_precision() -> str:
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"


def class_weights(spec, counts: np.ndarray) -> list[float] | None:
    if spec is None:
        return None
    if spec == "balanced":
        return (counts.sum() / (len(counts) * np.maximum(counts, 1))).tolist()
    if len(spec) != len(counts):
        raise ValueError(f"loss.class_weights has {len(spec)} values for {len(counts)} classes")
    return [float(w) for w in spec]


def monitor_mode(cfg: DictConfig) -> str:
    mode = cfg.callbacks.get("mode") or ("min" if "loss" in str(cfg.callbacks.monitor) else "max")
    if mode not in ("min", "max"):
        raise ValueError(f"callbacks.mode={mode!r} must be min or max (or null: min for a loss, max otherwise)")
    return mode


def build_trainer(cfg: DictConfig, out: Path) -> tuple[L.Trainer, ModelCheckpoint, TrainThroughput]:
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    if kwargs.get("precision") == "auto":
        kwargs["precision"] = auto_precision()
    kwargs = {"enable_model_summary": False, **{k: v for k, v in kwargs.items() if v is not None}}
    monitor, mode = cfg.callbacks.monitor, monitor_mode(cfg)
    ckpt = ModelCheckpoint(dirpath=out / "checkpoints", filename="best", monitor=monitor, mode=mode,
                           save_top_k=1, auto_insert_metric_name=False, enable_version_counter=False)
    # Lightning 2.6 writes save_last only when a top-k save happened; "last" must follow every epoch (resume=true)
    last = ModelCheckpoint(dirpath=out / "checkpoints", filename="last", monitor=None, save_top_k=1,
                           enable_version_counter=False)
    speed = TrainThroughput()
    callbacks = [ckpt, last, speed, NanGuard()]
    if cfg.callbacks.early_stopping_patience:
        callbacks.append(EarlyStopping(monitor=monitor, mode=mode, patience=cfg.callbacks.early_stopping_patience))
    if cfg.callbacks.ema_decay:
        callbacks.append(EMAWeightAveraging(decay=cfg.callbacks.ema_decay))
    if kwargs.get("enable_progress_bar", True):
        callbacks.append(RichProgressBar(leave=True))
    loggers = default_loggers(out, resuming=bool(cfg.resume or cfg.ckpt_path))
    trainer = L.Trainer(default_root_dir=out, callbacks=callbacks, logger=loggers,
                        deterministic=bool(cfg.deterministic), **kwargs)
    return trainer, ckpt, speed


def resume_path(cfg: DictConfig, out: Path) -> str | None:
    if cfg.ckpt_path:
        return str(cfg.ckpt_path)
    if cfg.resume:
        last = out / "checkpoints" / "last.ckpt"
        if not last.is_file():
            raise FileNotFoundError(f"resume=true but {last} does not exist: set paths.output_dir to the run "
                                    f"directory to resume, or pass ckpt_path=/path/to/file.ckpt")
        return str(last)
    return None


def build(cfg: DictConfig):
    """Data, backbone, strategy and module from the config (no Trainer): for tests and tools."""
    dm = instantiate(cfg.data)
    strategy = instantiate(cfg.strategy)
    image_size = cfg.data.get("image_size") or cfg.backbone.get("image_size")
    checkpoint = cfg.backbone.get("checkpoint")
    if checkpoint and not strategy.uses_pretrained:
        raise ValueError(f"strategy={strategy.name.lower()} trains from random init, but backbone.checkpoint={checkpoint} "
                         f"is set: drop backbone.checkpoint, or fine-tune it with strategy=full")
    backbone = create_backbone(
        cfg.backbone.name, dm.num_classes,
        pretrained=bool(cfg.backbone.pretrained) and strategy.uses_pretrained, checkpoint=checkpoint,
        image_size=image_size, head_init=cfg.backbone.get("head_init", "zero"),
        kwargs=OmegaConf.to_container(cfg.backbone.kwargs, resolve=True) if cfg.backbone.get("kwargs") else {},
    )
    dc = backbone.data_config
    dm.configure(dc["input_size"][-1], dc["interpolation"], dc["crop_pct"])
    model = strategy.prepare(backbone.model, backbone)
    options = TrainOptions(
        weight_decay=cfg.optim.weight_decay, betas=tuple(cfg.optim.betas), warmup_epochs=cfg.optim.warmup_epochs,
        min_lr_ratio=cfg.optim.min_lr_ratio, label_smoothing=cfg.loss.label_smoothing, mixup=cfg.loss.mixup,
        cutmix=cfg.loss.cutmix, class_weights=class_weights(cfg.loss.class_weights, dm.class_counts()),
        channels_last=bool(cfg.channels_last),
    )
    hparams = OmegaConf.to_container(cfg, resolve=True)
    module = TransferModule(model, backbone, strategy, dm.num_classes, options, hparams, classes=dm.classes,
                            geometry=dm.eval_geometry())
    return dm, backbone, module


def output_dir(cfg: DictConfig) -> Path:
    """``paths.output_dir``, or Hydra's run (or multirun job) directory when it is not set."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra = HydraConfig.get() if HydraConfig.initialized() else None
    if cfg.paths.get("output_dir"):  # in a multirun, one subfolder per job (as Hydra's own sweep dir has)
        sweep = hydra is not None and hydra.mode == RunMode.MULTIRUN
        return Path(cfg.paths.output_dir) / (str(hydra.job.num) if sweep else "")
    if hydra is None:
        raise ValueError("paths.output_dir is not set: pass paths.output_dir=DIR")
    return Path(hydra.runtime.output_dir)


def check_options(cfg: DictConfig) -> None:
    """Options that can only fail at the end of a run are checked before it starts."""
    from visionft.export import FORMATS

    if cfg.get("export") and cfg.export not in FORMATS:
        raise ValueError(f"export={cfg.export} is not an export format; valid: {', '.join(FORMATS)}")
    monitor_mode(cfg)


def evaluate(trainer: L.Trainer, module: TransferModule, dm, weights: str | None) -> tuple[dict, dict]:
    """Validate and test the one final model: the checkpoint's weights (the EMA weights when EMA is on), loaded
    weights-only into the module, which is then also what adapters and exports are made from."""
    if weights:  # through the strategy's checkpoint IO (weights-only), as Lightning itself loads checkpoints
        module.load_state_dict(trainer.strategy.load_checkpoint(weights, weights_only=True)["state_dict"])
    for cb in [c for c in trainer.callbacks if isinstance(c, WeightAveraging)]:
        trainer.callbacks.remove(cb)  # it would swap in (or reload) other weights around evaluation
    val = trainer.validate(module, datamodule=dm, verbose=False)[0]
    test = trainer.test(module, datamodule=dm, verbose=False)[0] if dm.sizes()["test"] else {}
    return val, test


def train(cfg: DictConfig) -> dict:
    """Fit, evaluate the final model (best checkpoint by ``callbacks.monitor``) on val and test, write
    ``metrics.json`` and ``config.yaml`` into the output directory, then artifacts and the export."""
    start = time.perf_counter()
    quiet_third_party(resuming=bool(cfg.resume or cfg.ckpt_path))
    out = output_dir(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    check_options(cfg)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    dm, backbone, module = build(cfg)
    if cfg.compile:
        from visionft.compile import maybe_compile

        maybe_compile(module, dm)
    trainer, ckpt, speed = build_trainer(cfg, out)
    log.info("backbone %s (weights: %s), data %s: %s", backbone.name, backbone.weights, type(dm).__name__,
             dm.sizes())
    trainer.fit(module, datamodule=dm, ckpt_path=resume_path(cfg, out))
    final = ckpt.best_model_path or str(out / "checkpoints" / "last.ckpt")
    val, test = evaluate(trainer, module, dm, final)
    metrics = {
        "artifacts": [],
        "val": {k: float(v) for k, v in val.items()},
        "test": {k: float(v) for k, v in test.items()},
        **module.param_counts(),
        "epochs": trainer.current_epoch,
        "wall_time_s": round(time.perf_counter() - start, 2),
        "train_images_per_s": round(speed.images_per_second, 1),
        "best_checkpoint": ckpt.best_model_path or None,
        "backbone": backbone.name,
        "weights": backbone.weights,
        "strategy": module.strategy.name,
        "data": dm.sizes(),
    }
    if not trainer.is_global_zero:
        return metrics
    write_outputs(metrics, cfg, out)
    metrics["artifacts"] = [str(a) for a in module.strategy.save_artifacts(module.model, out)]
    if cfg.get("export"):
        metrics["artifacts"].append(str(export_final(final, cfg.export, out, metrics, cfg)))
    write_outputs(metrics, cfg, out)
    print(summary(metrics, out))
    return metrics


class ExportFailed(RuntimeError):
    pass


def export_final(ckpt: str, fmt: str, out: Path, metrics: dict, cfg: DictConfig) -> Path:
    from visionft.export import export

    try:
        artifact, report = export(ckpt, fmt, out / "export" / fmt)
    except Exception as e:
        metrics["export_error"] = f"{type(e).__name__}: {e}"
        write_outputs(metrics, cfg, out)
        raise ExportFailed(f"export={fmt} failed after training ({type(e).__name__}: {str(e).splitlines()[0]}); "
                           f"the run is saved (metrics.json, config.yaml, checkpoints in {out}): retry with "
                           f"`visionft export --ckpt {ckpt} --format {fmt}`") from e
    worst = max(v["max_abs_diff"] for v in report.values() if isinstance(v, dict))
    log.info("exported %s: parity on %s, max |logit diff| %.2e", artifact, report["inputs"], worst)
    return artifact


def write_outputs(metrics: dict, cfg: DictConfig, out: Path) -> None:
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))


def summary(m: dict, out: Path) -> str:
    t = m["test"]
    return (f"\n{m['strategy']} on {m['backbone']} ({m['weights']}): test acc {t.get('test/acc', float('nan')):.4f}"
            f", macro-F1 {t.get('test/f1_macro', float('nan')):.4f}; trainable {m['trainable_params']:,} of "
            f"{m['total_params']:,} params; {m['train_images_per_s']:.0f} train img/s; {m['wall_time_s']:.0f} s\n"
            f"outputs: {out}\n")
