"""Probe engine (groundwork for the cached linear probe): embed a dataset once with a frozen backbone, then fit a
multinomial logistic-regression head on the features with full-batch L-BFGS, the L2 strength chosen on validation
over a log grid and warm-started along the path (the CLIP paper's linear-probe protocol)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def embed(model: nn.Module, loader, normalize, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-logit features (timm ``forward_features`` + ``forward_head(pre_logits=True)``) and labels of ``loader``'s
    batches of uint8 images; ``normalize`` maps a uint8 batch to the model's input."""
    model.eval().to(device)
    feats, labels = [], []
    for x, y in loader:
        x = normalize(x.to(device))
        feats.append(model.forward_head(model.forward_features(x), pre_logits=True).float().cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


@dataclass
class ProbeFit:
    weight: torch.Tensor  # (classes, features)
    bias: torch.Tensor
    l2: float  # the chosen strength: loss = mean cross-entropy + l2 / 2 * ||W||^2
    val_acc: float
    path: list[tuple[float, float]]  # (l2, val accuracy) over the grid


def _fit_one(x, y, num_classes, l2, init, max_iter) -> tuple[torch.Tensor, torch.Tensor]:
    w = init[0].clone().requires_grad_(True)
    b = init[1].clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-7, tolerance_change=1e-10,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + 0.5 * l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def solve(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor], num_classes: int,
          grid: list[float] | None = None, max_iter: int = 500) -> ProbeFit:
    """Fit the head for every L2 strength in ``grid`` (strong to weak, each warm-started from the previous), keep
    the one with the best validation accuracy (ties: the stronger L2)."""
    grid = sorted(grid or [10.0 ** e for e in range(-6, 1)], reverse=True)
    (x, y), (vx, vy) = train, val
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)  # standardize on train; folded back into W and b at the end
    xs, vxs = (x - mean) / std, (vx - mean) / std
    init = (torch.zeros(num_classes, x.shape[1]), torch.zeros(num_classes))
    best, path = None, []
    for l2 in grid:
        init = _fit_one(xs, y, num_classes, l2, init, max_iter)
        acc = ((vxs @ init[0].T + init[1]).argmax(1) == vy).float().mean().item()
        path.append((l2, acc))
        if best is None or acc > best[2]:
            best = (l2, init, acc)
    l2, (w, b), acc = best
    return ProbeFit(w / std, b - (w / std) @ mean, l2, acc, path)
