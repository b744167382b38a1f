"""``train(cfg)``: one run as explicit phases (build, fit, post-fit steps of the strategy, evaluation of the one
final model, outputs, artifacts, export). Tests and the Python API call it in-process."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, open_dict

from datamodules.imagefolder import BadImages
from visionft import cachedir, imbalance, resumecheck, runfolder
from visionft.build import build, build_trainer  # noqa: F401  (train(cfg) and tests build runs with these)
from visionft.callbacks import Interrupted, Preemption
from visionft.checkpoints import save_weights
from visionft.errors import UsageError
from visionft.evaluated import evaluate
from visionft.logs import quiet_third_party
from visionft.module import TransferModule
from visionft.outputs import (
    clear_report,
    export_final,
    summary,
    task_overrides,
    write_outputs,
    write_overrides,
    write_rejected,
    write_report,
)
from visionft.probe import ProbeRun, feature_metrics, knn_accuracies, run_probe
from visionft.report.predictions import TestPredictions, feature_probs
from visionft.report.predictions import save as save_predictions
from visionft.resume import resume_command
from visionft.shipped import ValPredictions, check_val_predictions, chosen_model, confusion_of, selected_by
from visionft.wise import same_at_every_alpha, snapshot, wise_ft

log = logging.getLogger(__name__)
NOT_IN_PROBE = ("label_smoothing", "mixup", "cutmix")  # loss options a closed-form probe head does not use


def output_dir(cfg: DictConfig) -> Path:
    """``paths.output_dir``, or Hydra's run (or multirun job) directory when it is not set."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra = HydraConfig.get() if HydraConfig.initialized() else None
    if cfg.paths.get("output_dir"):  # in a multirun, one subfolder per job (as Hydra's own sweep dir has)
        sweep = hydra is not None and hydra.mode == RunMode.MULTIRUN
        return Path(cfg.paths.output_dir) / (str(hydra.job.num) if sweep else "")
    if hydra is None:
        raise UsageError("paths.output_dir is not set: pass paths.output_dir=DIR")
    return Path(hydra.runtime.output_dir)


def check_options(cfg: DictConfig) -> None:
    """Options that can only fail at the end of a run are checked before it starts."""
    from visionft.export import FORMATS

    if cfg.get("export") and cfg.export not in FORMATS:
        raise UsageError(f"export={cfg.export} is not an export format; valid: {', '.join(FORMATS)}")
    if wise_alphas(cfg) and any(not 0.0 <= float(a) <= 1.0 for a in wise_alphas(cfg)):
        raise UsageError(f"wise.alphas={list(cfg.wise.alphas)} must lie in [0, 1] (0: start of fit, 1: fine-tuned)")
    mode = cfg.callbacks.get("mode")
    if mode not in (None, "min", "max"):
        raise UsageError(f"callbacks.mode={mode!r} must be min or max (or null: min for a loss, max otherwise)")


def load_final(trainer: L.Trainer, module: TransferModule, weights: str) -> None:
    """Make the module the one final model: the checkpoint's weights (the EMA weights when EMA is on), loaded
    weights-only through the strategy's checkpoint IO; it is then what post-fit steps, evaluation, adapters and
    exports see. The EMA callback is removed: it would swap in (or reload) other weights around evaluation."""
    if Path(weights).exists():
        module.load_state_dict(trainer.strategy.load_checkpoint(weights, weights_only=True)["state_dict"])
    for cb in [c for c in trainer.callbacks if isinstance(c, WeightAveraging)]:
        trainer.callbacks.remove(cb)


@dataclass
class Parts:
    """The objects of one run."""

    out: Path
    dm: object
    backbone: object
    module: TransferModule
    trainer: L.Trainer
    ckpt: object  # the monitored ModelCheckpoint (or None)
    speed: object  # TrainThroughput
    predicted: tuple | None = None  # the final model's test (probabilities, labels), for the report
    resumed: dict | None = None  # a resume's checkpoint, epoch, step and changes (``resumecheck.check``)


def set_up(cfg: DictConfig, overrides: list[str] | None = None) -> Parts:
    """Output directory (with ``overrides.yaml``, the command line, on record before anything can fail), option
    checks, seeding, and every object of the run."""
    quiet_third_party(resuming=bool(cfg.resume or cfg.ckpt_path))
    out = output_dir(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    check_options(cfg)
    if problem := runfolder.inside_data(cfg, out):
        raise UsageError(problem)
    out.mkdir(parents=True, exist_ok=True)
    runfolder.claim(cfg, out)  # locked until train() returns; a run already in it refused, resumed or replaced
    if not (cfg.resume or cfg.ckpt_path):  # a resume's command line is recorded once its checks pass (resumecheck)
        write_overrides(overrides, out)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    cachedir.set_limit(cfg.paths.get("cache_max_gb", cachedir.DEFAULT_MAX_GB))
    try:
        dm, backbone, module = build(cfg)
    except BadImages as e:  # on_bad_image=error: the whole list is in the run dir
        raise UsageError(f"{e} (all of them, with reasons: {write_rejected(e.rejected, out)})") from None
    resumed = resumecheck.check(cfg, out, module, dm, overrides)  # before anything in the folder changes
    if wise_alphas(cfg) and not (module.strategy.gradient_fit and module.gates.trains_body()):
        raise UsageError(f"wise.alphas interpolates the backbone between the start and the end of fine-tuning, and "
                         f"strategy {module.strategy.name} leaves the backbone as it was: drop wise.alphas (or use "
                         f"strategy=lp_ft)")
    if wise_alphas(cfg) and same_at_every_alpha(module, head_from_probe=module.strategy.head_probe() is not None):
        raise UsageError(f"wise.alphas has nothing to interpolate: strategy {module.strategy.name} trains only "
                         f"tensors WiSE-FT keeps as trained at both ends (the head, and randomly initialized ones "
                         f"such as prompt tokens, whose start is no pretrained model) and freezes the rest, so every "
                         f"alpha gives the fine-tuned model: drop wise.alphas")
    write_rejected(getattr(dm, "rejected", {}), out)  # every refusal above left the folder as it was
    (out / "checkpoints" / "final.ckpt").unlink(missing_ok=True)  # a reused run dir's old final model is not this run's
    clear_report(out)  # nor are its old predictions and figures
    unused = [k for k, on in (("compile", cfg.compile), *((f"loss.{k}", cfg.loss[k]) for k in NOT_IN_PROBE)) if on]
    if not module.strategy.gradient_fit and unused:
        log.warning("strategy %s solves its head in closed form on cached features: %s do%s not apply",
                    module.strategy.name, ", ".join(unused), "es" if len(unused) == 1 else "")
    if cfg.compile:
        from visionft.compile import maybe_compile

        maybe_compile(module, dm)
    trainer, ckpt, speed = build_trainer(cfg, out)
    trainer.callbacks.append(ValPredictions(module.meta["classes"]))  # val prediction counts: collapse check
    log.info("backbone %s (weights: %s), data %s: %s", backbone.name, backbone.weights, type(dm).__name__,
             "; ".join(f"{s} {n:,} images ({dm.split_origin.get(s, '?')})" for s, n in dm.sizes().items()))
    imbalance.warn(dm, module)  # per-class training counts: one line when a class is tiny and nothing weighs it up
    return Parts(out, dm, backbone, module, trainer, ckpt, speed, resumed=resumed)


def fit_phase(cfg: DictConfig, p: Parts) -> tuple[str, ProbeRun | None, dict | None]:
    """The probe head (if the strategy has one), then the gradient fit (if it has one). Returns the checkpoint of
    the final model, the probe, and the WiSE-FT starting state (None when off)."""
    probe = probe_head(cfg, p.trainer, p.module, p.dm)
    wise_start = snapshot(p.module.model) if wise_alphas(cfg) else None
    if not p.module.strategy.gradient_fit:
        return (save_weights(p.module, p.out / "checkpoints" / "final.ckpt") if p.trainer.is_global_zero else "",
                probe, wise_start)
    try:  # a resume was checked in set_up (resumecheck.check)
        p.trainer.fit(p.module, datamodule=p.dm, ckpt_path=p.resumed["from"] if p.resumed else None)
    except (SIGTERMException, SystemExit, KeyboardInterrupt) as e:  # SystemExit: Lightning's on a 2nd Ctrl+C
        stop = next(c for c in p.trainer.callbacks if isinstance(c, Preemption))
        if not isinstance(e, SIGTERMException) and not stop.at_once:
            raise
        raise stop.interrupted(p.out, p.trainer) from None
    return fitted_model(p), probe, wise_start


def fitted_model(p: Parts) -> str:
    """The checkpoint of the fitted model: the monitored best, else ``last.ckpt`` when this fit saved it, else
    (no checkpoint callback saved one, e.g. ``callbacks.best=null callbacks.last=null``) the weights at the end of
    the fit, saved as ``final.ckpt``."""
    best = p.ckpt.best_model_path if p.ckpt is not None else ""
    if best:
        return best
    last = p.out / "checkpoints" / "last.ckpt"
    saved = {Path(path).resolve() for c in p.trainer.checkpoint_callbacks
             for path in (c.best_model_path, c.last_model_path) if path}
    if last.resolve() in saved:
        return str(last)
    final = p.out / "checkpoints" / "final.ckpt"
    log.info("no checkpoint callback saved the model: the weights at the end of the fit are the final model (%s)",
             final)
    if p.trainer.is_global_zero:
        save_weights(p.module, final)
    return str(final)


def record(p: Parts, final: str, probe: ProbeRun | None, start: float) -> dict:
    m, n = p.module, p.module.gates.n_groups
    clock = getattr(m, "clock", None)
    return {
        "artifacts": [],
        "val": {}, "test": {},
        **p.module.param_counts(),
        "epochs": p.trainer.current_epoch,
        "wall_time_s": round(time.perf_counter() - start, 2),
        "train_images_per_s": round(p.speed.images_per_second, 1),
        "best_checkpoint": (p.ckpt.best_model_path if p.ckpt is not None else None) or None,
        "final_checkpoint": final or None,
        "chosen": chosen_model(m, final, p.out, selected_by(final, p.ckpt, m.strategy.gradient_fit),
                               m.param_counts()["total_params"]),
        "output_dir": str(p.out),
        "backbone": p.backbone.name,
        "weights": p.backbone.weights,
        "strategy": p.module.strategy.name,
        "data": p.dm.sizes(),
        "split_origin": dict(p.dm.split_origin),
        **imbalance.recorded(p.dm, p.module),  # class_counts (train), and the imbalance warning if any
        **({"probe": probe.summary()} if probe is not None else {}),
        **({"resumed": p.resumed} if p.resumed else {}),
        "precision": str(p.trainer.precision),
        "steps_per_epoch": clock.steps_per_epoch if clock is not None else None,
        "opens": {name: m.strategy.open_epoch(d, n) for d, name in enumerate(m.group_names)},
        "param_groups": m.param_group_rows(),
    }


def settle(cfg: DictConfig, p: Parts, final: str, probe: ProbeRun | None, wise_start: dict | None,
           metrics: dict) -> str:
    """Make the module the one final model (best checkpoint, post-fit step, WiSE-FT choice) and evaluate it on val
    and test (from cached features when no gradient step ran); returns the final model's checkpoint."""
    if p.module.strategy.gradient_fit:
        load_final(p.trainer, p.module, final)
    p.module.strategy.post_fit(p.module.adapted, p.trainer, p.dm)
    if wise_start is not None:
        metrics["wise"] = wise_ft(p.module, p.trainer, p.dm, wise_start, wise_alphas(cfg), p.out,
                                  head_from_probe=p.module.strategy.head_probe() is not None)
        if p.trainer.is_global_zero:
            final = metrics["final_checkpoint"] = save_weights(p.module, p.out / "checkpoints" / "final.ckpt")
    if p.module.strategy.gradient_fit:
        collector = TestPredictions()
        p.trainer.callbacks.append(collector)
        val, test = evaluate(p.trainer, p.module, p.dm)
        p.trainer.callbacks.remove(collector)
        predicted = collector.result
        if predicted is None and test:  # e.g. ddp_spawn: the test loop ran in worker processes
            log.warning("the test predictions were not collected in this process (%s): the report has no per-class "
                        "table, confusion matrix or wrong-image grid", type(p.trainer.strategy).__name__)
    else:
        val, test = evaluate_features(p.trainer, p.module, probe)
        predicted = feature_probs(p.module, probe.features["test"]) if "test" in probe.features else None
    p.predicted = predicted
    if "wise" in metrics and metrics.get("chosen"):
        metrics["chosen"]["wise_alpha"] = metrics["wise"]["alpha"]
    confusion = (next(c for c in p.trainer.callbacks if isinstance(c, ValPredictions)).result
                 if p.module.strategy.gradient_fit
                 else confusion_of(*feature_probs(p.module, probe.features["val"]), p.dm.num_classes))
    check_val_predictions(metrics, confusion, p.module.meta["classes"])
    number = lambda v: v if isinstance(v, int) else float(v)  # noqa: E731  (image counts stay integers)
    metrics.update(val={k: number(v) for k, v in val.items()}, test={k: number(v) for k, v in test.items()})
    if probe is not None:
        metrics["probe"]["knn"] = knn_accuracies(probe.knn_bank(), probe.features, p.dm.num_classes)
    return final


@runfolder.releasing  # the output folder's lock, however the run ends
def train(cfg: DictConfig, overrides: list[str] | None = None) -> dict:
    """Fit, evaluate the final model (best checkpoint by ``callbacks.monitor``, or the probe, or the WiSE-FT
    choice) on val and test, write ``metrics.json``, ``config.yaml`` and the report (``README.md``, ``report/``)
    into the output directory, then artifacts and the export. ``overrides``: the command line behind ``cfg``
    (under Hydra, Hydra's own), recorded so that the report can say how to reproduce the run."""
    start = time.perf_counter()
    overrides = task_overrides() if overrides is None else list(overrides)
    p = set_up(cfg, overrides)
    final, probe, wise_start = fit_phase(cfg, p)
    metrics = record(p, final, probe, start)
    if p.trainer.is_global_zero:  # the fit is on record before any later phase can fail
        write_outputs(metrics, cfg, p.out)
    try:
        final = settle(cfg, p, final, probe, wise_start, metrics)
    except SIGTERMException:  # after fit: the fitted model is on disk (metrics.json names it)
        raise Interrupted(f"SIGTERM received while evaluating: the fit is complete and saved ({final}); "
                          f"evaluate it with: {resume_command(p.out)}", "SIGTERM") from None
    metrics["wall_time_s"] = round(time.perf_counter() - start, 2)
    if not p.trainer.is_global_zero:
        return metrics
    write_outputs(metrics, cfg, p.out)
    metrics["artifacts"] = [str(a) for a in p.module.strategy.save_artifacts(p.module.adapted, p.out)]
    keep = (lambda: save_predictions(p.out, *p.predicted, p.module.meta["classes"], p.dm)) if p.predicted else None
    try:
        if cfg.get("export"):
            metrics["artifacts"].append(str(export_final(final, cfg.export, p.out, metrics, cfg)))
    finally:  # a failed export still leaves the report, and the card names the failure
        write_report(metrics, p.out, keep)
    write_outputs(metrics, cfg, p.out)
    print(summary(metrics, p.out))
    return metrics


def wise_alphas(cfg: DictConfig) -> list[float] | None:
    alphas = cfg.get("wise", {}).get("alphas")
    if alphas is None:
        return None
    if isinstance(alphas, (int, float)):
        alphas = [alphas]
    return [float(a) for a in alphas] or None


def probe_head(cfg: DictConfig, trainer: L.Trainer, module: TransferModule, dm) -> ProbeRun | None:
    """The strategy's probe head (cached features, L-BFGS), written into the classifier before any gradient step."""
    spec = module.strategy.head_probe()
    if spec is None:
        return None
    return run_probe(module, dm, spec, cfg.paths.get("cache_dir"), trainer.strategy.root_device,
                     str(trainer.precision))


def evaluate_features(trainer: L.Trainer, module: TransferModule, probe: ProbeRun) -> tuple[dict, dict]:
    """Val and test metrics of a frozen backbone + head from the probe's cached features (no forward pass),
    logged to the run's loggers as a fit's would be."""
    val = feature_metrics(module, probe.features["val"], "val")
    test = feature_metrics(module, probe.features["test"], "test") if "test" in probe.features else {}
    for logger in trainer.loggers:
        logger.log_metrics({**val, **test}, step=0)
        logger.save()
    images = {s: {f"{s}/images": len(probe.features[s].y)} if s in probe.features else {} for s in ("val", "test")}
    return val | images["val"], test | images["test"]
