"""``visionft embed``: pre-logit features of any backbone (a preset or timm name, pretrained) or of a trained
checkpoint, for a folder of images or a configured dataset split, written as ``.npz`` or ``.parquet`` (features,
labels, paths). Images are read and preprocessed as evaluation does (the checkpoint's own geometry)."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from visionft.errors import UsageError
from visionft.logs import printable

log = logging.getLogger(__name__)


def model_and_preprocessing(ckpt: str | None, backbone: str | None, image_size: int | None = None):
    """(model, preprocessing dict, stored run config or None) from a visionft checkpoint, or from a backbone preset
    or timm name."""
    from visionft.predict import preprocessing_of

    if ckpt:
        from visionft.trained import load_trained

        model, meta, hparams = load_trained(ckpt)
        if not hasattr(model, "forward_head"):
            raise UsageError(f"{ckpt}: its deployable model ({type(model).__name__}) has no pre-logit features to "
                             f"embed; embed its backbone instead with --backbone {meta['timm_name']}")
        return model.eval(), preprocessing_of(meta), hparams
    from importlib.resources import files

    from hydra.utils import instantiate

    from visionft.api import compose

    presets = {p.name[:-5] for p in files("visionft.conf").joinpath("backbone").iterdir() if p.name.endswith(".yaml")}
    cfg = compose([f"backbone={backbone}"] if backbone in presets - {"timm"}
                  else ["backbone=timm", f"backbone.name={backbone}"])
    made = instantiate(cfg.backbone, _convert_="all")(num_classes=1, image_size=image_size)  # pre-logits: any head
    dc = made.data_config
    meta = {"image_size": int(dc["input_size"][-1]), "interpolation": dc["interpolation"],
            "crop_pct": float(dc.get("crop_pct", 1.0)), "mean": dc["mean"], "std": dc["std"], "classes": []}
    log.info("backbone %s (weights: %s)", made.name, made.weights)
    return made.model.eval(), preprocessing_of(meta), None


class _Files(torch.utils.data.Dataset):
    """Image files, read as evaluation reads them. An unreadable file is recorded in ``failed`` (index -> reason)
    and yields a blank image, whose row the caller drops: read it in this process (no loader workers)."""

    def __init__(self, paths: list[Path], labels: list[int], prep: dict) -> None:
        from datamodules.transforms import eval_transform

        self.paths, self.labels, self.size = paths, labels, prep["size"]
        self.transform = eval_transform(prep["size"], prep["interpolation"], prep["crop_pct"])
        self.failed: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from datamodules.images import BadImage, read_rgb
        from datamodules.transforms import to_chw_uint8

        try:
            return to_chw_uint8(self.transform(image=read_rgb(str(self.paths[i])))["image"]), self.labels[i]
        except BadImage as e:
            self.failed[i] = str(e)
            log.warning("skipped unreadable %s", self.paths[i])
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), self.labels[i]


def folder_items(inputs: list[str]) -> tuple[list[Path], list[int], list[str]]:
    """Files under ``inputs``; an image inside ``<folder>/<class>/`` is labelled by its class folder (sorted class
    names), any other image gets label -1."""
    from visionft.predict import expand

    items = []
    for item in map(Path, inputs):
        for path in expand([str(item)]):
            rel = path.relative_to(item).parts if item.is_dir() else ()
            items.append((path, rel[0] if len(rel) > 1 else None))
    if not items:
        raise FileNotFoundError(f"no images found under {' '.join(inputs)}")
    classes = sorted({c for _, c in items if c is not None})
    return [p for p, _ in items], [classes.index(c) if c is not None else -1 for _, c in items], classes


def dataset_items(data: str, split: str, overrides: list[str], prep: dict, hparams: dict | None):
    """A split of a configured datamodule (``conf/data``; ``run``: the checkpoint's own data config, so its splits),
    with the model's evaluation geometry."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from visionft.api import compose
    from visionft.checkpoints import stored_node

    if data == "run":
        if hparams is None:
            raise UsageError("--data run takes the data config stored in --ckpt: pass --ckpt, or a dataset preset")
        node = OmegaConf.merge(stored_node(hparams, "data", "--ckpt"), OmegaConf.from_dotlist(
            [o.removeprefix("data.") for o in overrides]))
        dm = instantiate(stored_node({"data": node}, "data", "--ckpt"))
    else:
        dm = instantiate(compose([f"data={data}", *overrides]).data)
    dm.configure(prep["size"], prep["interpolation"], prep["crop_pct"])
    dm.eval_crop_pct = prep["crop_pct"]
    dm.setup()
    images = dm.splits[split].images
    paths = ([str(p) for p in images] if not isinstance(images, np.ndarray)
             else [f"{split}[{i}]" for i in range(len(images))])
    return dm.dataset(split, train_aug=False), paths, list(dm.classes)


def write(out: Path, feats: torch.Tensor, labels: torch.Tensor, paths: list[str], classes: list[str]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npz":
        np.savez(out, features=feats.numpy(), labels=labels.numpy(), paths=np.array(paths), classes=np.array(classes))
    elif out.suffix == ".parquet":
        try:
            import pandas as pd

            frame = pd.DataFrame({"path": [printable(p) for p in paths], "label": labels.numpy(),  # UTF-8 strings
                                  "class": [classes[i] if 0 <= i < len(classes) else None for i in labels.tolist()],
                                  "features": list(feats.numpy())})
            frame.to_parquet(out)  # pandas raises ImportError here without pyarrow or fastparquet
        except ImportError:
            raise UsageError("writing .parquet needs pandas and pyarrow (pip install pandas pyarrow); or use "
                             "--out features.npz") from None
    else:
        raise UsageError(f"--out {out}: the output must end in .npz or .parquet")


def embed_command(out: str, inputs: list[str] | None = None, data: str | None = None, split: str = "test",
                  ckpt: str | None = None, backbone: str | None = None, batch_size: int = 64,
                  overrides: list[str] = (), device: str | None = None) -> dict:
    from visionft.features import embed

    if bool(ckpt) == bool(backbone):
        raise UsageError("pass one of --ckpt (a trained visionft checkpoint) or --backbone (a preset or timm name)")
    if bool(inputs) == bool(data):
        raise UsageError("pass one of --inputs (image files or folders) or --data (a dataset preset, with --split)")
    if not str(out).endswith((".npz", ".parquet")):
        raise UsageError(f"--out {out}: the output must end in .npz or .parquet")
    size = None
    if data and backbone:  # a backbone embeds a dataset at the size its runs would use (data.image_size)
        from visionft.api import compose

        size = compose([f"data={data}", *overrides]).data.get("image_size")
    model, prep, hparams = model_and_preprocessing(ckpt, backbone, size)
    if inputs:
        paths, labels, classes = folder_items(inputs)
        dataset, paths = _Files(paths, labels, prep), [str(p) for p in paths]
    else:
        dataset, paths, classes = dataset_items(data, split, list(overrides), prep, hparams)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=0,
                                         pin_memory=device.type == "cuda")
    mean = torch.tensor(prep["mean"], device=device).view(1, -1, 1, 1) * 255
    std = torch.tensor(prep["std"], device=device).view(1, -1, 1, 1) * 255
    feats, labels = embed(model.to(device), loader, lambda x: (x.float() - mean) / std, device, progress="embed")
    failed = getattr(dataset, "failed", {})
    if len(failed) == len(paths):
        raise UsageError(f"none of the {len(paths)} images could be read (first: {paths[0]}: {failed[0]}): "
                         f"pass image files PIL can open")
    keep = [i for i in range(len(paths)) if i not in failed]
    feats, labels, kept = feats[keep], labels[keep], [paths[i] for i in keep]
    write(Path(out), feats, labels, kept, classes)
    return {"out": str(out), "images": len(kept), "dim": int(feats.shape[1]), "classes": classes,
            "failed": [(paths[i], why) for i, why in sorted(failed.items())]}
