"""Optimizer param groups and the LR schedule, as small pure functions.

Every param group is created at step 0 (fixed optimizer shape: resume and DDP stay trivial, no scheduler breaks
from groups added mid-run). Its LR at optimizer step t is ``lr * warmup_cosine(t) * lr_mult * open(epoch(t))``,
computed by a LambdaLR lambda, so what the optimizer holds is exactly what each group gets; timm's ``lr_scale``
key, which only timm's own schedulers read, is not used.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from torch import nn

from visionft.backbones import Backbone

_WRAPPER_PARTS = ("base_model.model.", ".base_layer", ".modules_to_save.default", ".original_module")


def plain_name(name: str) -> str:
    """A parameter's name in the plain timm model, with peft's wrapping removed."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def param_depths(model: nn.Module, backbone: Backbone) -> dict[str, int]:
    """Depth group of every parameter of ``model`` (the timm model, possibly wrapped by peft). Parameters that a
    wrapper added (LoRA A/B, DoRA magnitudes) belong to the group of the module they adapt."""
    owner = {p: g.index for g in backbone.groups for p in g.params}
    module_owner: dict[str, int] = {}
    for p, i in owner.items():
        parts = p.split(".")
        for k in range(len(parts) - 1, 0, -1):
            module_owner.setdefault(".".join(parts[:k]), i)
    out = {}
    for name, _ in model.named_parameters():
        plain = plain_name(name)
        if plain in owner:
            out[name] = owner[plain]
            continue
        parts = plain.split(".")
        hit = next((module_owner[".".join(parts[:k])] for k in range(len(parts) - 1, 0, -1)
                    if ".".join(parts[:k]) in module_owner), None)
        if hit is None:
            raise ValueError(f"parameter {name!r} belongs to no depth group of {backbone.name}")
        out[name] = hit
    return out


def build_param_groups(
    model: nn.Module,
    depths: dict[str, int],
    group_names: list[str],
    lr_mult: Callable[[int, str], float],
    weight_decay: float,
    no_decay: Iterable[str] = (),
) -> list[dict]:
    """One optimizer group per (depth group, decay or not, LR multiplier), in depth order. Norm weights, biases
    (ndim <= 1) and the model's ``no_weight_decay()`` names get no weight decay. Only parameters with
    ``requires_grad`` enter: those frozen for the whole run are left out."""
    no_decay = set(no_decay)
    buckets: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        depth = depths[name]
        decays = p.ndim > 1 and plain_name(name) not in no_decay
        mult = float(lr_mult(depth, name))
        key = (depth, not decays, mult)
        if key not in buckets:
            label = group_names[depth] + ("" if decays else "/no_decay") + (f"/x{mult:g}" if mult != 1 else "")
            buckets[key] = {"params": [], "name": label, "depth": depth, "lr_mult": mult,
                            "weight_decay": weight_decay if decays else 0.0}
        buckets[key]["params"].append(p)
    return [buckets[k] for k in sorted(buckets)]


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Linear warmup from 1/warmup_steps to 1 over ``warmup_steps`` optimizer steps, then cosine to min_lr_ratio."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_lambdas(
    param_groups: list[dict],
    is_open: Callable[[int, int], bool],
    steps_per_epoch: int,
    schedule: Callable[[int], float],
) -> list[Callable[[int], float]]:
    """LambdaLR's list form: one factor per group = schedule(step) x lr_mult x open(depth, epoch of step)."""

    def make(depth: int, mult: float) -> Callable[[int], float]:
        def factor(step: int) -> float:
            return schedule(step) * mult * float(is_open(depth, step // steps_per_epoch))

        return factor

    return [make(g["depth"], g["lr_mult"]) for g in param_groups]


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
