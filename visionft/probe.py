"""The linear probe done properly: embed each split once with the frozen backbone (cached per image,
``visionft.featurecache``), fit a multinomial logistic-regression head on the features with full-batch L-BFGS, the L2
strength chosen on validation over a log grid and warm-started along the path (the CLIP paper's linear-probe
protocol), and a weighted kNN on the same features (DINOv2's protocol). ``run_probe`` writes the head into the
model's classifier, so what follows (a fine-tuning phase for LP-FT, or nothing for a linear probe) starts from it and
the checkpoint is a normal one."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from visionft.featurecache import FeatureStore, image_ids, versions, view_ids
from visionft.features import Features, embed, weights_hash
from visionft.weights import is_under

log = logging.getLogger(__name__)
DEFAULT_GRID = tuple(10.0 ** e for e in range(-6, 3))  # L2 strengths on standardized features: 1e-6 .. 100


@dataclass
class ProbeSpec:
    """How a strategy's head is fitted on frozen features (``strategy.cache``, ``strategy.cache_views``, ...)."""

    cache: bool = True  # store features under paths.cache_dir and reuse them across runs and sweeps
    cache_views: int = 0  # 0: train split with the eval transform; K > 0: K augmented views of every train image
    l2_grid: tuple[float, ...] = DEFAULT_GRID
    max_iter: int = 500  # L-BFGS iterations per grid point
    splits: tuple[str, ...] = ("train", "val", "test")


@dataclass
class ProbeFit:
    weight: torch.Tensor  # (classes, features)
    bias: torch.Tensor
    l2: float  # the chosen strength: loss = (class-weighted) mean cross-entropy + l2 / 2 * ||W||^2 (standardized)
    val_acc: float  # with class weights, each val image counts with its class's weight
    path: list[tuple[float, float]]  # (l2, val accuracy) over the grid


@dataclass
class ProbeRun:
    fit: ProbeFit
    features: dict[str, Features] = field(default_factory=dict)  # train (its views), val, test
    embed_s: float = 0.0
    solve_s: float = 0.0
    bank: Features | None = None  # train with the eval transform (the kNN bank), when train holds augmented views

    def knn_bank(self) -> Features:
        return self.bank if self.bank is not None else self.features["train"]

    def summary(self) -> dict:
        return {"l2": self.fit.l2, "val_acc_path": [[l2, round(a, 4)] for l2, a in self.fit.path],
                "embed_s": round(self.embed_s, 2), "solve_s": round(self.solve_s, 2),
                "cache_hits": sorted(s for s, f in self._all().items() if f.hit),
                "embedded": sorted(s for s, f in self._all().items() if not f.hit)}

    def _all(self) -> dict[str, Features]:
        return {**self.features, **({"train_eval": self.bank} if self.bank is not None else {})}


# -- the solver ------------------------------------------------------------------------------------------------
def _fit_one(x, target, rw, l2, init, max_iter) -> tuple[torch.Tensor, torch.Tensor]:
    """One L2 strength: L-BFGS on the weighted mean cross-entropy + l2 / 2 * ||W||^2, with the gradient written
    analytically (softmax * rw - target, two matmuls; about twice as fast as autograd on this memory-bound problem).
    ``rw``: each row's weight over the total (1 / n without class weights); ``target``: one-hot rows times ``rw``."""
    w, b = init[0].clone().requires_grad_(True), init[1].clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-4, tolerance_change=1e-5,
                            history_size=20, line_search_fn="strong_wolfe")

    @torch.no_grad()
    def closure():
        logp = torch.addmm(b, x, w.T).log_softmax(1)
        g = logp.exp().mul_(rw).sub_(target)
        w.grad = torch.addmm(w, g.T, x, beta=l2)  # d/dW = g^T x + l2 W
        b.grad = g.sum(0)
        return -(logp * target).sum() + 0.5 * l2 * (w * w).sum()

    opt.step(closure)
    return w.detach(), b.detach()


def solve(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor], num_classes: int,
          grid=DEFAULT_GRID, max_iter: int = 500, class_weights=None) -> ProbeFit:
    """Fit the head for every L2 strength in ``grid`` (strong to weak, each warm-started from the previous), keep
    the one with the best validation accuracy (ties: the stronger L2). Runs on the features' device.

    ``class_weights`` (one per class, e.g. ``loss.class_weights=balanced``: n / (K * n_c)): each image's loss term
    is weighted by its class's weight and normalized by the total weight (``F.cross_entropy(weight=...)``'s weighted
    mean, what gradient training minimizes; with balanced weights, scikit-learn's ``class_weight="balanced"`` at
    C = 1 / (n * l2)), and validation accuracy weights each image by its class's weight too."""
    grid = sorted(grid, reverse=True)
    (x, y), (vx, vy) = train, val
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)  # standardize on train; folded back into W and b at the end
    xs, vxs = (x - mean) / std, (vx - mean) / std
    init = (x.new_zeros(num_classes, x.shape[1]), x.new_zeros(num_classes))
    cw = None if class_weights is None else torch.as_tensor(class_weights, dtype=xs.dtype, device=xs.device)
    rw = 1.0 / len(x) if cw is None else (cw[y] / cw[y].sum())[:, None]
    target = F.one_hot(y, num_classes).to(xs.dtype) * rw
    vw = torch.ones(len(vy), device=vx.device) if cw is None else cw[vy]
    best, path = None, []
    for l2 in grid:
        init = _fit_one(xs, target, rw, l2, init, max_iter)
        acc = ((((vxs @ init[0].T + init[1]).argmax(1) == vy) * vw).sum() / vw.sum()).item()
        path.append((l2, acc))
        if best is None or acc > best[2]:
            best = (l2, init, acc)
    l2, (w, b), acc = best
    return ProbeFit((w / std).cpu(), (b - (w / std) @ mean).cpu(), l2, acc, path)


# -- kNN (DINOv2's weighted vote) ----------------------------------------------------------------------------------
@torch.no_grad()
def knn_scores(train: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, num_classes: int, ks=(20,),
               temperature: float = 0.07, chunk: int = 1024) -> dict[int, torch.Tensor]:
    """Class scores of ``x`` for each k by a cosine-similarity kNN over ``train``: each of the k nearest neighbours
    votes for its class with weight exp(similarity / temperature). Neighbours are found once, for the largest k."""
    keys, labels = F.normalize(train[0].float(), dim=1), train[1]
    kmax = min(max(ks), len(keys))
    sims, idxs = zip(*[(q @ keys.T).topk(kmax, dim=1) for q in F.normalize(x.float(), dim=1).split(chunk)])
    sim, idx = torch.cat(sims), torch.cat(idxs)  # sorted by similarity: the k nearest are a prefix
    return {k: torch.zeros(len(sim), num_classes).scatter_add_(1, labels[idx[:, :min(k, kmax)]],
                                                              (sim[:, :min(k, kmax)] / temperature).exp())
            for k in ks}


def knn_accuracies(bank: Features, features: dict[str, Features], num_classes: int, ks=(10, 20, 100, 200),
                   temperature: float = 0.07) -> dict[str, dict[str, float]]:
    """kNN accuracy on val and test for each k (DINOv2's protocol; the bank: train images, eval transform). A k
    above the bank's size would vote with the whole bank: it is skipped, and the skip logged."""
    skipped = [k for k in ks if k > len(bank.y)]
    if skipped:
        log.info("kNN k=%s skipped: the bank holds %d training images", ",".join(map(str, skipped)), len(bank.y))
    ks = [k for k in ks if k not in skipped]
    out = {f"k={k}": {} for k in ks}
    for split, f in features.items():
        if ks and split != "train" and len(f.y):
            for k, scores in knn_scores((bank.x, bank.y), f.x, num_classes, ks, temperature).items():
                out[f"k={k}"][split] = round((scores.argmax(1) == f.y).float().mean().item(), 4)
    return out


# -- orchestration ---------------------------------------------------------------------------------------------
class _SeededViews(torch.utils.data.Dataset):
    """The train split under its augmentation, K views of every image: view k of image i is the augmentation
    training's epoch k would draw for it (``datamodules.loaders.SeededDataset``), whatever the number of workers."""

    def __init__(self, dataset, views: int, seed: int) -> None:
        from datamodules.loaders import SeededDataset

        self.seeded, self.views, self.n = SeededDataset(dataset, seed), views, len(dataset)

    def __len__(self) -> int:
        return self.views * self.n

    def __getitem__(self, i: int):
        return self.seeded[(i // self.n, i % self.n)]


def autocast_dtype(precision: str) -> torch.dtype | None:
    precision = str(precision)
    return torch.bfloat16 if precision.startswith("bf16") else torch.float16 if precision.startswith("16") else None


class _Rows(NamedTuple):
    """One entry's images: the dataset that embeds them, the store key, an id and a label per row."""

    dataset: torch.utils.data.Dataset
    key: dict
    ids: list[bytes]
    labels: torch.Tensor


def _rows(module, dm, split: str, views: int, device, precision: str, backbone_hash: str) -> _Rows:
    """The split's dataset (the eval transform, or ``views`` seeded augmented views), the key of everything besides
    the image that changes its features, and its rows' ids (``visionft.featurecache``)."""
    dataset, device = dm.dataset(split, train_aug=views > 0), torch.device(device)
    key = {"backbone": module.meta["timm_name"], "model_kwargs": module.meta["model_kwargs"], "weights": backbone_hash,
           "transform": repr(dataset.transform), "augmented": views > 0, "image_size": dm.image_size,
           "mean": module.meta["mean"], "std": module.meta["std"], "precision": str(precision),
           "device": device.type, **versions(),
           "tf32": [torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32]
           if device.type == "cuda" else None}
    ids, labels = image_ids(dm.splits[split].images), torch.as_tensor(dm.splits[split].labels, dtype=torch.long)
    if views:
        ids, labels = view_ids(ids, views, dm.seed), labels.repeat(views)
        return _Rows(_SeededViews(dataset, views, dm.seed), key, ids, labels)
    return _Rows(dataset, key, ids, labels)


def _embed_rows(module, dm, rows: dict[str, _Rows], todo: dict[str, torch.Tensor], device, precision: str):
    """The rows ``todo`` names of each entry, embedded in one pass (one loader: worker processes start once)."""
    parts = [torch.utils.data.Subset(rows[s].dataset, todo[s].tolist()) for s in todo]
    loader = torch.utils.data.DataLoader(torch.utils.data.ConcatDataset(parts), batch_size=dm.eval_batch_size,
                                         num_workers=dm.num_workers, pin_memory=torch.device(device).type == "cuda")
    x, _ = embed(module.adapted.model, loader, module.normalize, device, autocast_dtype(precision),
                 progress=f"embed {'+'.join(todo)}")
    return dict(zip(todo, x.split([len(p) for p in parts])))


def probe_features(module, dm, spec: ProbeSpec, cache: FeatureStore, device, precision: str,
                   backbone_hash: str) -> dict[str, Features]:
    """Features of every split ``spec`` names (and ``train_eval``, the kNN bank, with augmented views): the rows
    cached for their images read, the others embedded in one pass and stored, one block per configuration."""
    entries = {s: (s, spec.cache_views if s == "train" else 0) for s in spec.splits
               if s in dm.splits and len(dm.splits[s])}
    if spec.cache_views:  # the kNN bank: train with the eval transform
        entries["train_eval"] = ("train", 0)
    rows = {name: _rows(module, dm, s, views, device, precision, backbone_hash) for name, (s, views) in entries.items()}
    cached = {s: cache.read(r.key, r.ids) for s, r in rows.items()}
    todo = {s: (~found).nonzero().flatten() for s, (_, found) in cached.items() if not found.all()}
    start, new, groups = time.perf_counter(), {}, {}
    if todo:
        new = _embed_rows(module, dm, rows, todo, device, precision)
        for s in todo:
            groups.setdefault(json.dumps(rows[s].key, sort_keys=True), []).append(s)
    seconds, total = time.perf_counter() - start, sum(len(t) for t in todo.values())
    for names in groups.values():
        cache.write(rows[names[0]].key, [rows[s].ids[i] for s in names for i in todo[s].tolist()],
                    torch.cat([new[s] for s in names]))
    feats = {}
    for s, r in rows.items():
        x = cached[s][0]
        if s in new:
            x = new[s].new_zeros(len(r.ids), new[s].shape[1]) if x is None else x
            x[todo[s]] = new[s]
        feats[s] = Features(x.contiguous(), r.labels, hit=s not in todo,
                            seconds=seconds * len(todo[s]) / total if s in todo else 0.0)
    return feats


def run_probe(module, dm, spec: ProbeSpec, cache_dir, device="cpu", precision: str = "32-true") -> ProbeRun:
    """Embed the splits ``spec`` names (cached), solve the head on train/val, write it into the classifier."""
    model, classifier = module.adapted.model, module.adapted.backbone.classifier
    backbone_hash = weights_hash(model, skip=lambda n: is_under(n, classifier))
    module.to(device)
    head = nn.Module.get_submodule(model, classifier)
    cache = FeatureStore(cache_dir if spec.cache else None)
    start = time.perf_counter()
    feats = probe_features(module, dm, spec, cache, device, precision, backbone_hash)
    bank = feats.pop("train_eval", None)
    embed_s = time.perf_counter() - start
    start = time.perf_counter()
    fit = solve((feats["train"].x.to(device), feats["train"].y.to(device)),
                (feats["val"].x.to(device), feats["val"].y.to(device)), dm.num_classes, spec.l2_grid, spec.max_iter,
                module.options.class_weights)  # loss.class_weights
    with torch.no_grad():
        head.weight.copy_(fit.weight.to(head.weight).view_as(head.weight))  # (C, D), or (C, D, 1, 1) for a conv head
        head.bias.copy_(fit.bias.to(head.bias))
    run = ProbeRun(fit, feats, embed_s, time.perf_counter() - start, bank)
    log.info("probe head: L2 %.0e chosen on val (acc %.4f); embedding %.1f s (cached: %s), solve %.1f s",
             fit.l2, fit.val_acc, embed_s, ", ".join(run.summary()["cache_hits"]) or "none", run.solve_s)
    return run


def feature_logits(module, feats: Features) -> torch.Tensor:
    """The model's head applied to cached features, in fp32 on the CPU (as the saved checkpoint runs)."""
    head = nn.Module.get_submodule(module.adapted.model, module.adapted.backbone.classifier)
    with torch.no_grad():
        return F.linear(feats.x, head.weight.detach().float().cpu().flatten(1), head.bias.detach().float().cpu())


def feature_metrics(module, feats: Features, stage: str) -> dict[str, float]:
    """The stage's metrics (loss, acc, macro-F1, top-5) of the model's head on cached features: what evaluating
    the frozen backbone + head on the images gives (same transform, same precision; the head itself is applied in
    fp32, as the saved checkpoint runs), without a forward pass."""
    from visionft.metrics import make_metrics

    logits = feature_logits(module, feats)
    with torch.no_grad():
        metrics = make_metrics(logits.shape[1], f"{stage}/")(logits, feats.y)
        out = {f"{stage}/loss": F.cross_entropy(logits, feats.y).item()}
    return out | {k: float(v) for k, v in metrics.items()}
