"""Frozen-backbone features: pre-logit features of a model's input batches (``embed``), and the hashes that tell
whether cached ones still apply (``weights_hash``, ``split_hash``). They are cached on disk by
``visionft.featurecache``."""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class Features:
    x: torch.Tensor  # (N * views, D) float32 pre-logit features
    y: torch.Tensor  # (N * views,) int64 labels
    hit: bool = False  # every row read from the cache (no image was embedded)
    seconds: float = 0.0  # time spent embedding (0 on a cache hit)


def weights_hash(model: nn.Module, skip: Callable[[str], bool] = lambda name: False) -> str:
    """SHA-256 over a module's state (names, dtypes, shapes, bytes), leaving out the entries ``skip`` names."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if skip(name):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_id(path) -> str:
    st = os.stat(path)
    return f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"


def split_hash(images, labels: np.ndarray) -> str:
    """SHA-256 of a split: the pixels of an in-memory split, or each file's path, size and mtime (as make does)."""
    h = hashlib.sha256(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    if isinstance(images, np.ndarray):
        h.update(f"{images.dtype}|{images.shape}|".encode())
        h.update(np.ascontiguousarray(images).tobytes())
        return h.hexdigest()
    for path in images:
        h.update(os.fsencode(f"{file_id(path)}\n"))  # the path's own bytes
    return h.hexdigest()


def is_convnet(model: nn.Module) -> bool:
    """More than one 2-D convolution (a ViT's patch embedding alone does not count): NHWC pays off."""
    return sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 1


@torch.no_grad()
def embed(model: nn.Module, loader, normalize: Callable, device: str | torch.device = "cpu",
          dtype: torch.dtype | None = None, progress: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-logit features (timm ``forward_features`` + ``forward_head(pre_logits=True)``, the classifier's input) and
    labels of ``loader``'s uint8 batches; ``normalize`` maps a uint8 batch to the model's input; ``dtype``: autocast
    (e.g. bfloat16) or None for full precision. A convnet runs in channels_last (NHWC) while it embeds (measured
    15-25% faster on CPU for EfficientNet-Lite0, the usual gain with AMP on GPU) and is given back as it came."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = torch.device(device)
    nhwc = is_convnet(model)
    if nhwc:
        formats = {n: p.is_contiguous(memory_format=torch.channels_last) for n, p in model.named_parameters()
                   if p.dim() == 4}
        model.to(memory_format=torch.channels_last)
    feats, labels = [], []
    batches = tqdm(loader, desc=progress, leave=False, disable=progress is None or None)
    try:
        for x, y in batches:
            x = normalize(x.to(device))
            x = x.contiguous(memory_format=torch.channels_last) if nhwc else x
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                f = model.forward_head(model.forward_features(x), pre_logits=True)
            feats.append(f.float().cpu())
            labels.append(torch.as_tensor(y))
    finally:
        model.train(was_training)  # a fine-tuning phase that follows runs in the mode it was given
        if nhwc:
            for n, p in model.named_parameters():
                if p.dim() == 4 and not formats[n]:
                    p.data = p.data.contiguous()
    return torch.cat(feats), torch.cat(labels)
