"""The Python API: compose a run from overrides, fit it, get its metrics, directory and trained model back, and load
a trained run for inference. ``python -m visionft`` is a thin layer over the same ``train(cfg)``.

    import visionft
    run = visionft.fit(["strategy=bitfit", "trainer.max_epochs=2"])     # or fit(visionft.compose([...]))
    run.metrics["test"]["test/acc"], run.dir
    trained = visionft.load(run.dir)                                     # or a .ckpt path
    trained.predict(["photo.jpg", array_hwc_uint8], topk=3)
"""
from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, open_dict

from visionft.errors import UsageError


def compose(overrides: Sequence[str] = (), config_dir: str | Path | None = None) -> DictConfig:
    """The config ``python -m visionft <overrides>`` runs (``config_dir``: an extra search path, like --config-dir);
    ``resume=true paths.output_dir=RUN`` brings that run's own overrides, as on the command line."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from visionft.resume import with_run_overrides

    overrides = with_run_overrides(list(overrides))
    if config_dir is not None:
        overrides.append(f"hydra.searchpath=[file://{Path(config_dir).resolve()}]")
    GlobalHydra.instance().clear()
    with initialize_config_module("visionft.conf", version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


@dataclass
class Run:
    metrics: dict
    dir: Path
    _trained: Trained | None = field(default=None, repr=False)

    @property
    def model(self):
        """The trained model, deployable (adapters merged where they can be), in eval mode."""
        return self.trained.model

    @property
    def trained(self) -> Trained:
        if self._trained is None:
            self._trained = load(self.dir)
        return self._trained


def fit(config: DictConfig | Sequence[str] = (), output_dir: str | Path | None = None) -> Run:
    """Train one run in-process; ``config`` is a composed config or a list of overrides. Without an output
    directory (argument or ``paths.output_dir``) the run goes to ``outputs/<date>/<time>`` like the CLI's."""
    from visionft.resume import with_run_overrides
    from visionft.train import train

    if not isinstance(config, DictConfig):  # resume=true and a run folder: with that run's own overrides
        config = with_run_overrides(list(config), output_dir)
    cfg = copy.deepcopy(config) if isinstance(config, DictConfig) else compose(config)  # the caller's stays as given
    stamp = time.strftime("%Y-%m-%d/%H-%M-%S") + f"-{time.time_ns() // 1000 % 1_000_000:06d}"
    out = output_dir or cfg.paths.get("output_dir") or Path("outputs") / stamp
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    # the command line the run's card gives: the overrides as `python -m visionft` would take them
    overrides = None if isinstance(config, DictConfig) else [*config, *([f"paths.output_dir={output_dir}"]
                                                                         if output_dir else [])]
    metrics = train(cfg, overrides)
    return Run(metrics, Path(metrics["output_dir"]))


@dataclass
class Trained:
    """A trained run loaded for inference (weights-only): its deployable model, metadata and preprocessing."""

    model: object
    meta: dict

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    def predict(self, images: Sequence, topk: int = 5, batch_size: int = 64) -> list[dict]:
        """Top-k rows (``label_1``, ``prob_1``, ...) for image files or RGB uint8 HWC arrays, preprocessed exactly
        as the run evaluated."""
        from visionft.predict import predict_images, preprocessing_of

        rows, failed = predict_images(self.model, preprocessing_of(self.meta),
                                      ((i if not isinstance(im, (str, Path)) else im, im)
                                       for i, im in enumerate(images)),
                                      topk, batch_size)
        if failed:
            raise UsageError(f"cannot read {len(failed)} image(s): {failed[:3]}")
        return rows


def load(path: str | Path) -> Trained:
    """A run directory (its final model, as ``metrics.json`` names it: final.ckpt when a probe or WiSE-FT made it,
    else best, else last) or a visionft ``.ckpt`` file, for inference."""
    from visionft.checkpoints import run_checkpoint
    from visionft.trained import load_trained

    model, meta, _ = load_trained(run_checkpoint(path))
    return Trained(model, meta)
