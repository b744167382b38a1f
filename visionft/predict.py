"""Batch inference with an exported artifact (TorchScript: torch alone; ONNX: onnxruntime; ExportedProgram: torch),
a visionft ``.ckpt`` or a run directory (its final model). Preprocessing (size, interpolation, crop, mean/std) and
label names come from the ``config.json`` beside an artifact, or from the checkpoint's metadata: the geometry the
run evaluated with. Images are read like training images (``datamodules.images.read_rgb``: any PIL format, EXIF
orientation, alpha on white, 16-bit scaled, first frame), and unreadable ones are listed, not fatal. A folder laid
out as ``<folder>/<class>/...`` with the model's class names is labelled: each row gets its ``true_label``."""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import torch

from visionft.errors import UsageError
from visionft.logs import printable
from visionft.trained import ACCEPTS, ARTIFACTS, load_runner

log = logging.getLogger(__name__)




def open_model(path: str | Path):
    """(runner, preprocessing) of what ``--model`` names: an exported artifact (``config.json`` beside it), an export
    folder, a visionft ``.ckpt`` (its deployable model, on the CPU) or a run directory (its final model)."""
    from visionft.checkpoints import run_checkpoint

    path = Path(path)
    if path.is_dir() and not (path / "checkpoints").is_dir():  # an export folder: its artifact
        path = next((path / f"model{s}" for s in ARTIFACTS if (path / f"model{s}").is_file()), path)
    if not path.exists():
        raise FileNotFoundError(_missing(str(path)))
    path = run_checkpoint(path)
    if path.suffix in ARTIFACTS:
        return load_runner(path), read_config(path)
    if path.suffix != ".ckpt":
        raise UsageError(f"--model {path} is not a model file predict reads: {ACCEPTS}")
    from visionft.trained import load_trained

    model, meta, _ = load_trained(path)
    return (lambda x: model(x).detach()), preprocessing_of(meta)


def _missing(model: str) -> str:
    """What to say when ``--model`` names no file: a timm name is not a trained model."""
    import timm

    if model.startswith(("hf-hub:", "hf_hub:", "timm/")) or timm.is_model(model):
        return (f"--model {model} is a timm model name, not a trained model: {ACCEPTS}. Train one first "
                f"(python -m visionft backbone.name={model} data.root=...), or embed with it (visionft embed "
                f"--backbone {model})")
    return f"--model {model} does not exist: {ACCEPTS}"


def read_config(artifact: Path) -> dict:
    path = artifact.parent / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: predict needs the config.json written by `visionft export` "
                                f"beside {artifact.name}, or pass the run's .ckpt or run directory as --model")
    cfg = json.loads(path.read_text())
    pre = cfg["pretrained_cfg"]
    return {"size": int(pre["input_size"][-1]), "interpolation": pre.get("interpolation", "bicubic"),
            "crop_pct": float(pre.get("crop_pct", 1.0)), "mean": pre["mean"], "std": pre["std"],
            "labels": cfg.get("label_names") or [str(i) for i in range(cfg["num_classes"])]}


def expand(inputs: list[str]) -> list[Path]:
    """Files given, and every image file under folders given (any format PIL opens; hidden entries ignored)."""
    from datamodules.images import image_extensions

    extensions, files = image_extensions(), []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.suffix.lower() in extensions and p.is_file()
                            and not any(part.startswith(".") for part in p.relative_to(item).parts))
        else:
            files.append(item)
    return files


def preprocessing_of(meta: dict) -> dict:
    """The predict config of a checkpoint's metadata (what ``read_config`` gives for an exported artifact)."""
    return {"size": int(meta["image_size"]), "interpolation": meta["interpolation"],
            "crop_pct": float(meta["crop_pct"]), "mean": meta["mean"], "std": meta["std"],
            "labels": list(meta["classes"])}


def _rgb_uint8(image) -> np.ndarray:
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        raise UsageError(f"an image array must be RGB uint8 of shape (H, W, 3), got {array.dtype} {array.shape}: "
                         f"scale floats in [0, 1] by 255 and cast to uint8, or pass the file path")
    return array


def predict_images(run, cfg: dict, items, topk: int = 5, batch_size: int = 64):
    """Top-k rows for ``items``: (key, image) pairs where the image is a file path (read like training images) or
    an RGB uint8 HWC array. Unreadable files are returned in ``failed`` (and logged), not fatal."""
    from datamodules.images import BadImage, read_rgb
    from datamodules.transforms import eval_transform, normalize_uint8, to_chw_uint8

    transform = eval_transform(cfg["size"], cfg["interpolation"], cfg["crop_pct"])
    k = min(topk, len(cfg["labels"]))
    rows, failed, batch = [], [], []

    def flush():
        x = normalize_uint8(torch.stack([t for _, t in batch]), cfg["mean"], cfg["std"])
        with torch.no_grad():
            probs = torch.as_tensor(run(x)).float().softmax(-1)
        p, idx = probs.topk(k, dim=1)
        for (key, _), pi, ii in zip(batch, p.tolist(), idx.tolist()):
            rows.append({"path": str(key), **{f"label_{j + 1}": cfg["labels"][c] for j, c in enumerate(ii)},
                         **{f"prob_{j + 1}": round(v, 6) for j, v in enumerate(pi)}})
        batch.clear()

    for key, image in items:
        try:
            array = read_rgb(str(image)) if isinstance(image, (str, Path)) else _rgb_uint8(image)
            batch.append((key, to_chw_uint8(transform(image=array)["image"])))
        except (BadImage, OSError) as e:
            failed.append((str(key), str(e)))
            log.warning("skipped unreadable %s", key)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return rows, failed


def labelled(inputs: list[str], classes: list[str]) -> list[tuple[Path, str | None]]:
    """Every image under ``inputs`` with its true label: a folder whose images all lie in ``<folder>/<class>/...``
    with ``<class>`` one of the model's classes is labelled by those folder names; anything else gets None."""
    out = []
    for item in map(Path, inputs):
        files = expand([str(item)])
        labels = [f.relative_to(item).parts[0] if item.is_dir() and len(f.relative_to(item).parts) > 1 else None
                  for f in files]
        if not all(label in classes for label in labels):
            labels = [None] * len(files)
        out += zip(files, labels)
    return out


def accuracy(rows: list[dict]) -> tuple[float, int] | None:
    """Top-1 accuracy over the rows that have a true label, and their count (None when no row has one)."""
    scored = [r for r in rows if r.get("true_label")]
    return (sum(r["label_1"] == r["true_label"] for r in scored) / len(scored), len(scored)) if scored else None


def predict(model: str | Path, inputs: list[str], topk: int = 5, out: str | Path | None = None,
            batch_size: int = 64) -> tuple[list[dict], list[tuple[str, str]]]:
    """Top-k predictions of ``model`` (an exported artifact, a .ckpt or a run directory) for every readable image
    under ``inputs`` (files, folders); images of a labelled folder also get ``true_label``."""
    runner, cfg = open_model(model)
    items = labelled(inputs, cfg["labels"])
    truth = {str(p): label for p, label in items if label is not None}
    rows, failed = predict_images(runner, cfg, ((p, p) for p, _ in items), topk, batch_size)
    for r in rows if truth else []:
        r["true_label"] = truth.get(r["path"], "")
    if out:
        k = min(topk, len(cfg["labels"]))
        with open(out, "w", newline="") as f:
            cols = ["path", *(["true_label"] if truth else []), *(f"label_{j + 1}" for j in range(k)),
                    *(f"prob_{j + 1}" for j in range(k))]
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows({**r, "path": printable(r["path"])} for r in rows)  # a name that is not UTF-8: caf\xe9
    return rows, failed
