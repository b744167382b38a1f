"""Benchmarks: run named cases through ``train(cfg)`` in-process and print a table and JSON.

    python tools/bench.py                       # the offline quickstart (default config)
    python tools/bench.py --case strategies     # every strategy on the default backbone and data
    python tools/bench.py --case cifar10 data.root=$(../shared/tools/unpack-cifar10)   # real CIFAR-10 JPEGs
    python tools/bench.py --case quickstart --out bench.json trainer.max_epochs=4   # extra Hydra overrides
    python tools/bench.py --case lp_ft --seeds 0 1 2                   # LP-FT / WiSE-FT vs full, mean ± std
    python tools/bench.py --case probe --cifar-root $(../shared/tools/unpack-cifar10)  # the probe's bars
    python tools/bench.py --case overhead [--device cuda]          # visionft vs a raw loop, every backbone x strategy
    python tools/bench.py --case overhead --cifar-root DIR         # resident CIFAR JPEGs vs a decode-once tensor loop

Each row: test accuracy and macro-F1 of the best checkpoint, trainable/total parameters, train images/s (training
batches only) and the whole run's wall time (data, model build, fit, val and test). Speed targets live here, not in
timed tests.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from omegaconf import open_dict

WISE = "[0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1]"
CASES = {
    "quickstart": {"quickstart": []},
    "strategies": {s: [f"strategy={s}"] for s in (
        "scratch", "linear_probe", "partial", "full", "gradual_unfreeze", "layerwise_lr", "ulmfit", "lora", "dora")},
    # the parameter-efficient family; VPT needs a ViT, and no pretrained ViT weights can be had offline here, so its
    # rows use a random-init ViT-S (a mechanics check beside a linear probe on the same frozen backbone)
    "family": {
        "bitfit": ["strategy=bitfit"],
        "bitfit_norm": ["strategy=bitfit", "strategy.norm=true"],
        "ssf": ["strategy=ssf"],
        "peft_loha": ["strategy=peft", "strategy.method=loha"],
        "peft_lokr": ["strategy=peft", "strategy.method=lokr"],
        "vit_random_linear_probe": ["backbone=vit_small", "backbone.pretrained=false", "strategy=linear_probe"],
        "vit_random_vpt": ["backbone=vit_small", "backbone.pretrained=false", "strategy=vpt"],
        "vit_random_vpt_deep": ["backbone=vit_small", "backbone.pretrained=false", "strategy=vpt",
                                "strategy.deep=true"],
        "adapter": ["strategy=adapter"],
        "adapter_sequential": ["strategy=adapter", "strategy.placement=sequential"],
        "vit_random_adapter": ["backbone=vit_small", "backbone.pretrained=false", "strategy=adapter"],
    },
    # QLoRA: LoRA on a 4-bit / 8-bit frozen base against LoRA on the float base, same seed, same random-init ViT-S
    # (bitsandbytes quantizes linear layers; the offline EfficientNet has none outside its head)
    "quantize": {
        "vit_random_lora": ["backbone=vit_small", "backbone.pretrained=false", "strategy=lora"],
        "vit_random_lora_nf4": ["backbone=vit_small", "backbone.pretrained=false", "strategy=lora",
                                "strategy.quantize=nf4"],
        "vit_random_lora_int8": ["backbone=vit_small", "backbone.pretrained=false", "strategy=lora",
                                 "strategy.quantize=int8"],
    },
    # LP-FT and WiSE-FT against full fine-tuning (run with --seeds 0 1 2); lp_ft_cifar10 needs data.root as cifar10
    "lp_ft": {
        "full": ["strategy=full"],
        "full_wise": ["strategy=full", f"wise.alphas={WISE}"],
        "lp_ft": ["strategy=lp_ft"],
        "lp_ft_wise": ["strategy=lp_ft", f"wise.alphas={WISE}"],
    },
    "lp_ft_cifar10": {
        "full": ["experiment=cifar10_subset", "strategy=full"],
        "full_wise": ["experiment=cifar10_subset", "strategy=full", f"wise.alphas={WISE}"],
        "lp_ft": ["experiment=cifar10_subset", "strategy=lp_ft"],
        "lp_ft_wise": ["experiment=cifar10_subset", "strategy=lp_ft", f"wise.alphas={WISE}"],
    },
    # real CIFAR-10 JPEGs: pass data.root=<.../cifar10> (e.g. $(../shared/tools/unpack-cifar10))
    "cifar10": {
        "full": ["experiment=cifar10_subset", "strategy=full"],
        "full_timm_head_init": ["experiment=cifar10_subset", "strategy=full", "backbone.head_init=timm"],
        "linear_probe": ["experiment=cifar10_subset", "strategy=linear_probe"],
        "gradual_unfreeze": ["experiment=cifar10_subset", "strategy=gradual_unfreeze"],
        "lora": ["experiment=cifar10_subset", "strategy=lora"],
        "lora_timm_head_init": ["experiment=cifar10_subset", "strategy=lora", "backbone.head_init=timm"],
    },
}


def run(name: str, overrides: list[str], out: Path) -> dict:
    from visionft.train import train

    with initialize_config_module("visionft.conf", version_base="1.3"):
        cfg = compose("config", overrides=["trainer.enable_progress_bar=false", *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(out / name)
    m = train(cfg)
    return {"case": name, "overrides": " ".join(overrides), "test_acc": round(m["test"].get("test/acc", 0.0), 4),
            "test_f1_macro": round(m["test"].get("test/f1_macro", 0.0), 4),
            "trainable_params": m["trainable_params"], "total_params": m["total_params"],
            "train_images_per_s": m["train_images_per_s"], "wall_time_s": m["wall_time_s"], "epochs": m["epochs"],
            **({"wise_alpha": m["wise"]["alpha"]} if "wise" in m else {})}


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds of each case's test accuracy and wall time (n given)."""
    import numpy as np

    out = []
    for case in dict.fromkeys(r["case"] for r in rows):
        mine = [r for r in rows if r["case"] == case]
        acc, wall = np.array([r["test_acc"] for r in mine]), np.array([r["wall_time_s"] for r in mine])
        out.append({"case": case, "n": len(mine), "seeds": " ".join(str(r["seed"]) for r in mine),
                    "test_acc": f"{acc.mean():.4f} ± {acc.std(ddof=1) if len(acc) > 1 else 0:.4f}",
                    "wall_time_s": f"{wall.mean():.0f} ± {wall.std(ddof=1) if len(wall) > 1 else 0:.0f}",
                    "trainable_params": mine[0]["trainable_params"],
                    "wise_alpha": " ".join(str(r["wise_alpha"]) for r in mine if "wise_alpha" in r) or "-"})
    return out


def table(rows: list[dict], cols: list[str] | None = None) -> str:
    cols = cols or ["case", "test_acc", "test_f1_macro", "trainable_params", "total_params", "train_images_per_s",
                    "wall_time_s", "epochs"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:,}" if isinstance(r.get(c), int) else str(r.get(c, r.get("error", "")))
                                       for c in cols) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", choices=sorted([*CASES, "probe", "overhead", "quant_memory"]), default="quickstart")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="overhead: where both loops run")
    p.add_argument("--cells", nargs="+", default=None, metavar="BACKBONE[:STRATEGY]",
                   help="overhead: only these cells (e.g. resnet50 resnet18@32:full)")
    p.add_argument("--out", type=Path, default=None, help="write the JSON here too")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="run every case once per seed (seed=S); "
                   "adds a mean ± std table")
    p.add_argument("--cifar-root", type=Path, default=None,
                   help="CIFAR-10 JPEGs (ImageFolder): the probe case's photos; overhead: the resident-data cell")
    p.add_argument("overrides", nargs="*", help="Hydra overrides applied to every run")
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="visionft-bench-"))
    if a.case == "probe":
        from bench_probe import COLUMNS, probe_rows

        rows, cols = probe_rows(work, a.cifar_root, a.overrides), COLUMNS
    elif a.case == "quant_memory":
        from bench_quant import COLUMNS, quant_memory_rows

        rows, cols = quant_memory_rows(), COLUMNS
    elif a.case == "overhead":
        from bench_overhead import COLUMNS, overhead_rows

        photos = None
        if a.cifar_root:  # the resident path on real JPEGs (ResNet-18 at 32 px) vs a decode-once tensor loop
            from bench_probe import build_cifar_photos

            photos = str(build_cifar_photos(a.cifar_root, work / "cifar10_photos",
                                            # train: >= 28 batches of 512 on CUDA
                                            (("train", 4900 if a.device == "cuda" else 500),
                                             ("val", 20), ("test", 20))))
        rows, cols = overhead_rows(work, a.device, a.overrides, a.cells or (["resnet18@32:full"] if photos else None),
                                   photos), COLUMNS
    else:
        seeds = a.seeds or [None]
        rows = [{**run(f"{name}" + (f"-s{s}" if s is not None else ""),
                       [*ov, *a.overrides, *([f"seed={s}"] if s is not None else [])], work),
                 "case": name, "seed": s} for s in seeds for name, ov in CASES[a.case].items()]
        cols = None
    report = {"machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                          "python": platform.python_version(), "torch": torch.__version__},
              "rows": rows}
    print(table(rows, cols))
    if a.case in CASES and a.seeds:
        report["mean_std"] = aggregate(rows)
        print(table(report["mean_std"], ["case", "n", "seeds", "test_acc", "wall_time_s", "trainable_params",
                                         "wise_alpha"]))
    print(json.dumps(report, indent=2))
    if a.out:
        a.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
