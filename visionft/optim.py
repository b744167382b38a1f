"""Optimizer param groups and the LR schedule, as small pure functions.

Every param group is created at step 0 (fixed optimizer shape: resume and DDP stay trivial, no scheduler breaks
from groups added mid-run). Its LR at optimizer step t is ``lr * shape(t in its phase) * lr_mult * open(epoch(t))``,
computed by a LambdaLR lambda, so what the optimizer holds is exactly what each group gets; timm's ``lr_scale``
key, which only timm's own schedulers read, is not used.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from visionft.errors import UsageError


def build_param_groups(
    model: nn.Module,
    depths: dict[str, int],
    group_names: list[str],
    lr_mult: Callable[[int, str], float],
    weight_decay: float,
    no_decay: Callable[[str], bool] = lambda name: False,
) -> list[dict]:
    """One optimizer group per (depth group, decay or not, LR multiplier), in depth order. Norm weights, biases
    (ndim <= 1) and the names ``no_decay`` accepts (the model's ``no_weight_decay()``) get no weight decay. Only
    parameters with ``requires_grad`` enter: those frozen for the whole run are left out."""
    buckets: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        depth = depths[name]
        decays = p.ndim > 1 and not no_decay(name)
        mult = float(lr_mult(depth, name))
        key = (depth, not decays, mult)
        if key not in buckets:
            label = group_names[depth] + ("" if decays else "/no_decay") + (f"/x{mult:g}" if mult != 1 else "")
            buckets[key] = {"params": [], "name": label, "depth": depth, "lr_mult": mult,
                            "weight_decay": weight_decay if decays else 0.0}
        buckets[key]["params"].append(p)
    return [buckets[k] for k in sorted(buckets)]


@dataclass(frozen=True)
class Clock:
    """Optimizer steps -> epochs and phases, one clock for the open set and the LR. A phase starts at an epoch
    (``strategy.phase_starts``); the schedule restarts there, counting from the phase start over the phase's length
    (to the next phase, or the end of the run)."""

    steps_per_epoch: int
    total_steps: int
    phase_starts: tuple[int, ...] = (0,)

    def epoch(self, step: int) -> int:
        return step // self.steps_per_epoch

    def phase(self, step: int) -> tuple[int, int]:
        """(step within its phase, length of that phase) in optimizer steps."""
        starts = sorted({0, *(e * self.steps_per_epoch for e in self.phase_starts
                              if e * self.steps_per_epoch < self.total_steps)})
        start = max(s for s in starts if s <= step)
        end = min((s for s in starts if s > step), default=self.total_steps)
        return step - start, max(1, end - start)


def lr_lambdas(
    param_groups: list[dict],
    is_open: Callable[[int, int], bool],
    clock: Clock,
    shape: Callable[[int, int, int], float],
) -> list[Callable[[int], float]]:
    """LambdaLR's list form: one factor per group = shape(step in phase) x lr_mult x open(depth, epoch of step)."""

    def make(depth: int, mult: float) -> Callable[[int], float]:
        def factor(step: int) -> float:
            return shape(*clock.phase(step), clock.steps_per_epoch) * mult * float(is_open(depth, clock.epoch(step)))

        return factor

    return [make(g["depth"], g["lr_mult"]) for g in param_groups]


def training_horizon(trainer) -> tuple[int, int]:
    """(optimizer steps in the run, optimizer steps per epoch), from the real number of training batches per epoch
    (after ``limit_train_batches``) and gradient accumulation; ``max_steps`` may end the run before the last epoch."""
    total = trainer.estimated_stepping_batches
    if not math.isfinite(total):
        raise UsageError("trainer.max_epochs=-1 with no trainer.max_steps trains forever, but the LR schedule needs an "
                         "end: set trainer.max_epochs=N or trainer.max_steps=N")
    if trainer.train_dataloader is None:  # max_epochs=-1 + max_steps: Lightning did not load the data to estimate
        trainer.fit_loop.setup_data()
    batches = trainer.num_training_batches
    per_epoch = math.ceil(batches / trainer.accumulate_grad_batches) if math.isfinite(batches) else int(total)
    return max(1, int(total)), max(1, per_epoch)


def weight_decay_of(factory) -> float:
    """The weight decay an optimizer factory (a ``functools.partial``, Hydra ``_partial_: true``) was configured
    with: decaying groups get it, no-decay groups 0."""
    return float(getattr(factory, "keywords", {}).get("weight_decay", 0.0))


def make_optimizer(factory, groups: list[dict], lr: float, on_cuda: bool):
    """``factory(groups, lr=lr)``; on CUDA, the fused kernel where the optimizer has one and none was chosen."""
    if "lr" in getattr(factory, "keywords", {}):
        raise UsageError("optimizer.lr is not used: the base LR is the strategy's, set strategy.lr=...")
    func = getattr(factory, "func", factory)
    fused = (on_cuda and "fused" in inspect.signature(func).parameters
             and "fused" not in getattr(factory, "keywords", {}))
    return factory(groups, lr=lr, **({"fused": True} if fused else {}))


def group_table(rows: list[dict]) -> str:
    """Fixed-width text table of param-group rows (dicts with the same keys)."""
    if not rows:
        return ""
    cols = list(rows[0])
    cells = [[_fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths)))  # noqa
    return "\n".join([line(cols), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if v else "0"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)
