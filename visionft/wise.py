"""WiSE-FT (Wortsman et al. 2022): after fit, interpolate between the starting weights and the fine-tuned ones,
theta(alpha) = (1 - alpha) * theta_start + alpha * theta_end, and keep the alpha with the best validation accuracy.

The start is the model as fit began: the pretrained backbone with the probe head for LP-FT; otherwise the pretrained
backbone with the *trained* head (a fresh zero head is no starting point). Adapters anchor what they add
(``Adapted.wise_anchor``): for low-rank and bottleneck adapters alpha scales the adapter; for tuners whose factors
enter nonlinearly (Hadamard or Kronecker products, rotations) the merged weights follow the straight line
W0 + alpha * dW. Where every trained tensor is kept as trained at both ends (VPT's random prompts, the head) every
alpha is one model (``same_at_every_alpha``) and a run refuses ``wise.alphas`` before training. BatchNorm running
statistics interpolate with the weights; integer buffers are the end's. The curve is written as
``wise/alpha_curve.csv`` and ``.png``; the chosen model is left in the module, so test, artifacts and export all see
it."""
from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def interpolate(start: dict, end: dict, alpha: float) -> dict:
    return {k: torch.lerp(start[k].to(v), v, alpha) if v.is_floating_point() else v for k, v in end.items()}


def anchor_state(module, start: dict, end: dict, head_from_probe: bool) -> dict:
    adapted = module.adapted
    anchor = adapted.wise_anchor(start, end)
    if head_from_probe:
        return anchor
    params = dict(module.model.named_parameters())
    head = module.gates.n_groups - 1
    return {k: end[k] if k in params and adapted.depth_of(k) == head else v for k, v in anchor.items()}


def same_at_every_alpha(module, head_from_probe: bool) -> bool:
    """Whether theta(alpha) is one model whatever alpha: every tensor that trains is anchored at its trained value
    (prompt tokens start random, so their start is no pretrained model) and no frozen one gets an anchor of its own.
    Anchors are chosen by name, so markers stand in for the tensors: ``end`` for the end (and for frozen tensors,
    which end as they start), another for the start of those that train."""
    if module.strategy.bn == "train" and module.adapted.bn_depths():
        return False  # BatchNorm statistics move from the start to the end
    end_marker, trainable = torch.ones(()), module.gates.trainable
    keys = list(module.model.state_dict())
    start = {k: torch.zeros(()) if k in trainable else end_marker for k in keys}
    anchor = anchor_state(module, start, dict.fromkeys(keys, end_marker), head_from_probe)
    return all(anchor[k] is end_marker for k in keys)


def wise_ft(module, trainer, dm, start: dict, alphas, out: Path, head_from_probe: bool) -> dict:
    """Evaluate theta(alpha) on val for every alpha, load the best (ties: lower val loss), write the curve."""
    end = snapshot(module.model)
    anchor = anchor_state(module, start, end, head_from_probe)
    rows = []
    for alpha in sorted(float(a) for a in alphas):
        module.model.load_state_dict(interpolate(anchor, end, alpha))
        val = trainer.validate(module, datamodule=dm, verbose=False)[0]
        rows.append({"alpha": alpha, "val_acc": float(val["val/acc"]), "val_loss": float(val["val/loss"])})
        log.info("WiSE-FT alpha %.2f: val acc %.4f, loss %.4f", alpha, rows[-1]["val_acc"], rows[-1]["val_loss"])
    # under DDP, rank 0 decides and its model is every rank's (logged losses are per rank)
    rows = trainer.strategy.broadcast(rows, src=0)
    best = max(rows, key=lambda r: (r["val_acc"], -r["val_loss"]))
    chosen = interpolate(anchor, end, best["alpha"])
    module.model.load_state_dict(trainer.strategy.broadcast(chosen, src=0) if trainer.world_size > 1 else chosen)
    module.adapted.wise_chosen(best["alpha"])
    if trainer.is_global_zero:
        write_curve(rows, best["alpha"], out / "wise")
    return {"alpha": best["alpha"], "curve": rows}


def write_curve(rows: list[dict], chosen: float, folder: Path) -> None:
    from matplotlib.figure import Figure  # a figure outside pyplot: no global backend switch in a user's session

    from visionft.atomic import replacing, write_text

    table = io.StringIO(newline="")
    w = csv.DictWriter(table, fieldnames=["alpha", "val_acc", "val_loss"])
    w.writeheader()
    w.writerows(rows)
    write_text(folder / "alpha_curve.csv", table.getvalue())
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    ax.plot([r["alpha"] for r in rows], [r["val_acc"] for r in rows], marker="o")
    ax.axvline(chosen, color="gray", linestyle="--", label=f"chosen alpha = {chosen:g}")
    ax.set(xlabel="alpha (0: start of fit, 1: fine-tuned)", ylabel="val accuracy", title="WiSE-FT")
    ax.legend()
    fig.tight_layout()
    with replacing(folder / "alpha_curve.png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
