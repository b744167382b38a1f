"""Strategies whose head comes from a converged linear probe on cached frozen features (``visionft.probe``):
the linear probe itself, and LP-FT (probe, then fine-tune from it; Kumar et al. 2022)."""
from __future__ import annotations

from dataclasses import dataclass

from visionft.errors import UsageError
from visionft.probe import DEFAULT_GRID, ProbeSpec
from visionft.strategies.base import Strategy
from visionft.strategies.basic import Partial

SOLVERS = ("lbfgs", "adamw")


@dataclass
class _ProbeOptions:
    cache: bool = True  # keep features under paths.cache_dir, reused across runs and sweeps; false: this run only
    cache_views: int = 0  # K > 0: fit on K augmented views of every training image (embedded once, cached)
    l2_grid: tuple[float, ...] | None = None  # L2 strengths tried on val (standardized features); None: 1e-6 .. 100
    max_iter: int = 500  # L-BFGS iterations per L2 strength

    def _check_probe(self) -> None:
        if isinstance(self.l2_grid, (int, float)):  # strategy.l2_grid=1e-3: one strength
            self.l2_grid = (float(self.l2_grid),)
        if self.cache_views < 0:
            raise UsageError(f"strategy.cache_views={self.cache_views} must be >= 0 (0: the eval transform only)")
        if self.l2_grid is not None and (not self.l2_grid or min(self.l2_grid) < 0):
            raise UsageError(f"strategy.l2_grid={list(self.l2_grid)} must be a non-empty list of L2 strengths >= 0")

    def _spec(self, splits: tuple[str, ...]) -> ProbeSpec:
        return ProbeSpec(cache=self.cache, cache_views=int(self.cache_views),
                         l2_grid=tuple(self.l2_grid or DEFAULT_GRID), max_iter=self.max_iter, splits=splits)


@dataclass
class LinearProbe(_ProbeOptions, Strategy):
    """Frozen feature extractor, only the head trains; every backbone BatchNorm stays in eval mode.

    ``solver=lbfgs`` (default): the head is the converged L2-regularized logistic regression on cached features
    (class-weighted by ``loss.class_weights``), and no gradient epoch runs; ``solver=adamw``: the head trains for
    ``trainer.max_epochs`` with the configured optimizer on images re-embedded every epoch (train augmentation
    applies)."""

    lr: float = 1e-2
    solver: str = "lbfgs"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_probe()
        if self.solver not in SOLVERS:
            raise UsageError(f"strategy.solver={self.solver!r} is not a probe solver; valid: {', '.join(SOLVERS)}")

    def open_epoch(self, index: int, n_groups: int) -> int | None:
        return 0 if index == n_groups - 1 else None

    def head_probe(self) -> ProbeSpec | None:
        return self._spec(("train", "val", "test")) if self.solver == "lbfgs" else None

    @property
    def gradient_fit(self) -> bool:
        return self.solver != "lbfgs"


@dataclass
class LpFt(_ProbeOptions, Partial):
    """LP-FT: the head starts as the converged probe (cached features), then the backbone fine-tunes from it at a
    lower LR, with the schedule's warmup; ``freeze_depth`` input-side groups stay frozen (0: full), ``layer_decay``
    applies as for full fine-tuning."""

    lr: float = 2e-4
    freeze_depth: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_probe()

    def head_probe(self) -> ProbeSpec | None:
        return self._spec(("train", "val"))
