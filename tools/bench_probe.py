"""The linear probe's bars (``python tools/bench.py --case probe [--cifar-root DIR]``), per dataset, in one process:

- the raw reference: one frozen forward pass over train+val+test, written as a user would (DataLoader, no_grad,
  ``forward_features`` + ``forward_head(pre_logits=True)``), timed after a one-batch warm-up; its features feed
- (for the record, not a bar) the same pass in channels_last, as visionft embeds a convnet;
- scikit-learn's ``LogisticRegression`` (lbfgs, standardized features, C tuned on the same val split);
- visionft's probe run (``strategy=linear_probe``, the whole ``train(cfg)``: build, embed, solve, evaluate, write)
  with a fresh feature cache, then again reusing it (it must embed nothing), then today's gradient head
  (``strategy.solver=adamw`` at its default epochs). The raw pass and the cold run are each timed ``REPEATS`` times
  (a fresh cache each time) and the faster counts.

Bars: probe test accuracy >= scikit-learn's - 0.5 point; cold run <= 1.2x the raw forward pass; >= 10x faster than
the AdamW head. Datasets: digits, and with ``--cifar-root`` a real-photo ImageFolder built here from CIFAR-10 JPEGs
(train/val/test = 100/50/200 per class, links to the original files, 64 px).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from omegaconf import open_dict

REPEATS = 2  # the raw pass and the cold run are each timed twice; the faster of each counts (noise of a shared machine)
COLUMNS = ["dataset", "images", "raw_forward_s", "raw_nhwc_s", "probe_cold_s", "cold_vs_forward", "probe_warm_s",
           "warm_embedded", "adamw_s", "adamw_vs_probe", "probe_test_acc", "sklearn_test_acc", "probe_minus_sklearn_pt",
           "adamw_test_acc", "knn20_test_acc"]


def build_cifar_photos(cifar: Path, dest: Path, per_split=(("train", 100), ("val", 50), ("test", 200))) -> Path:
    """A real-photo ImageFolder (symlinks to CIFAR-10 JPEGs): train and val from CIFAR's train split (disjoint),
    test from its test split; the first files of each class in name order."""
    for c in sorted(p.name for p in (cifar / "train").iterdir() if p.is_dir()):
        train_files = sorted((cifar / "train" / c).iterdir())
        chunks = {"train": train_files[:per_split[0][1]],
                  "val": train_files[per_split[0][1]:per_split[0][1] + per_split[1][1]],
                  "test": sorted((cifar / "test" / c).iterdir())[:per_split[2][1]]}
        for split, files in chunks.items():
            (dest / split / c).mkdir(parents=True, exist_ok=True)
            for f in files:
                link = dest / split / c / f.name
                if not link.exists():
                    link.symlink_to(f.resolve())
    return dest


def _cfg(overrides: list[str], out: Path):
    with initialize_config_module("visionft.conf", version_base="1.3"):
        cfg = compose("config", overrides=["trainer.enable_progress_bar=false", *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    return cfg


@torch.no_grad()
def raw_forward(overrides: list[str], out: Path, nhwc: bool = False) -> tuple[float, dict]:
    """One frozen forward pass over every split, timed; returns (seconds, split -> (features, labels)). ``nhwc``: the
    same pass with the model and inputs in channels_last (what a user who knows the trick would write)."""
    from visionft.train import build

    dm, backbone, _ = build(_cfg(overrides, out))
    model = backbone.model.eval()
    fmt = torch.channels_last if nhwc else torch.contiguous_format
    model.to(memory_format=fmt)
    mean = torch.tensor(backbone.data_config["mean"]).view(1, -1, 1, 1) * 255
    std = torch.tensor(backbone.data_config["std"]).view(1, -1, 1, 1) * 255
    loaders = {s: torch.utils.data.DataLoader(dm.dataset(s, train_aug=False), batch_size=dm.eval_batch_size,
                                              num_workers=dm.num_workers) for s in ("train", "val", "test")}
    x, _ = next(iter(loaders["val"]))
    model.forward_head(model.forward_features(((x.float() - mean) / std).contiguous(memory_format=fmt)),
                       pre_logits=True)  # warm-up
    times = []
    for _ in range(REPEATS):
        start, feats = time.perf_counter(), {}
        for split, loader in loaders.items():
            fs, ys = [], []
            for x, y in loader:
                x = ((x.float() - mean) / std).contiguous(memory_format=fmt)
                fs.append(model.forward_head(model.forward_features(x), pre_logits=True))
                ys.append(y)
            feats[split] = (torch.cat(fs).numpy(), torch.cat(ys).numpy())
        times.append(time.perf_counter() - start)
    return min(times), feats


def sklearn_probe(feats: dict) -> tuple[float, float]:
    """scikit-learn's reference: standardized features, LogisticRegression(lbfgs), C tuned on val (the C grid spans
    the same L2 strengths as visionft's grid, C = 1 / (l2 * n), plus decades)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    (x, y), (vx, vy), (tx, ty) = feats["train"], feats["val"], feats["test"]
    scaler = StandardScaler().fit(x)
    x, vx, tx = scaler.transform(x), scaler.transform(vx), scaler.transform(tx)
    grid = sorted({1.0 / (10.0 ** e * len(x)) for e in range(-6, 3)} | {10.0 ** e for e in range(-4, 4)})
    best = None
    for c in grid:
        clf = LogisticRegression(C=c, max_iter=5000).fit(x, y)
        acc = clf.score(vx, vy)
        if best is None or acc > best[0]:
            best = (acc, c, clf)
    return best[2].score(tx, ty), best[1]


def probe_rows(work: Path, cifar_root: Path | None, extra: list[str]) -> list[dict]:
    from visionft.train import train

    datasets = {"digits": ["data=digits"]}
    if cifar_root:
        photos = build_cifar_photos(Path(cifar_root), work / "cifar10_photos")
        datasets["cifar10_photos"] = ["data=imagefolder", f"data.root={photos}", "data.image_size=64"]
    rows = []
    for name, data in datasets.items():
        common = ["strategy=linear_probe", f"paths.cache_dir={work / ('cache-' + name)}", *data, *extra]
        raw_s, feats = raw_forward(common, work / f"{name}-raw")
        nhwc_s, _ = raw_forward(common, work / f"{name}-raw-nhwc", nhwc=True)
        colds = [train(_cfg([*common, f"paths.cache_dir={work / f'cache-{name}-{r}'}"], work / f"{name}-cold{r}"))
                 for r in range(REPEATS)]  # each with an empty cache
        cold = min(colds, key=lambda m: m["wall_time_s"])
        warm = train(_cfg([*common, f"paths.cache_dir={work / f'cache-{name}-0'}"], work / f"{name}-warm"))
        adamw = train(_cfg([*common, "strategy.solver=adamw"], work / f"{name}-adamw"))
        sk_acc, sk_c = sklearn_probe(feats)
        acc = cold["test"]["test/acc"]
        rows.append({
            "dataset": name, "images": sum(len(v[1]) for v in feats.values()), "raw_forward_s": round(raw_s, 2),
            "raw_nhwc_s": round(nhwc_s, 2),
            "probe_cold_s": cold["wall_time_s"], "cold_vs_forward": round(cold["wall_time_s"] / raw_s, 2),
            "probe_warm_s": warm["wall_time_s"], "warm_embedded": ",".join(warm["probe"]["embedded"]) or "none",
            "adamw_s": adamw["wall_time_s"], "adamw_vs_probe": round(adamw["wall_time_s"] / cold["wall_time_s"], 1),
            "probe_test_acc": round(acc, 4), "sklearn_test_acc": round(sk_acc, 4),
            "probe_minus_sklearn_pt": round(100 * (acc - sk_acc), 2),
            "adamw_test_acc": round(adamw["test"]["test/acc"], 4),
            "knn20_test_acc": cold["probe"]["knn"]["k=20"]["test"], "probe_l2": cold["probe"]["l2"], "sklearn_C": sk_c,
            "probe_embed_s": cold["probe"]["embed_s"], "probe_solve_s": cold["probe"]["solve_s"],
            "bars": {"accuracy": acc >= sk_acc - 0.005, "cost": cold["wall_time_s"] <= 1.2 * raw_s,
                     "vs_adamw": adamw["wall_time_s"] >= 10 * cold["wall_time_s"],
                     "warm_skips_embedding": not warm["probe"]["embedded"]},
        })
    return rows
