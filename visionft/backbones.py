"""Backbones: one entry point over ``timm.create_model``, ordered depth groups from timm's ``group_matcher``, and
the data config (input size, interpolation, mean/std, crop) from the model's ``pretrained_cfg``."""
from __future__ import annotations

import difflib
import logging
import re
import reprlib
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
from timm.data import resolve_data_config
from timm.models import group_parameters
from torch import nn

from visionft.errors import UsageError
from visionft.weights import apply_state_dict, is_under, load_pretrained, load_state_dict_file

log = logging.getLogger(__name__)
HEAD_INITS = ("zero", "timm")
# timm.create_model / build_model_with_cfg arguments that change how layers are built or how strictly weights load,
# and open nothing: allowed in backbone.kwargs beside the architecture's own arguments
TIMM_BUILD_FLAGS = frozenset({"scriptable", "exportable", "no_jit", "pretrained_strict", "feature_cfg",
                              "kwargs_filter"})
# timm's loading arguments: they open files or fetch weights, so neither backbone.kwargs nor a checkpoint may hold them
_LOADING = frozenset({"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_filter_fn",
                      "pretrained_model_args", "checkpoint_path", "cache_dir"})
_LOADING_NAME = re.compile(r"^paths?$|(?<!drop)_paths?$|(^|_)(file|url|uri|dir|hub)s?$|(^|_)hub_")  # not drop_path


def loading_kwargs(kwargs: dict) -> list[str]:
    """The keys of ``kwargs`` that are timm loading arguments (a file, a URL, a cache, a hub or weights to fetch)."""
    return [k for k in kwargs if str(k) in _LOADING or _LOADING_NAME.search(str(k))]


def refuse_loading_kwargs(kwargs: dict, where: str) -> None:
    """One line, exit 2, when ``kwargs`` (``where``: backbone.kwargs or a checkpoint's model_kwargs) hold a timm
    loading argument."""
    bad = loading_kwargs(kwargs)
    if bad:
        raise UsageError(f"{where}: {', '.join(f'{k}={reprlib.repr(kwargs[k])}' for k in bad)}: timm loading arguments "
                         f"(they open files or fetch weights) are not model arguments; set local weights with "
                         f"backbone.checkpoint=<file>: refusing to build the model")


@dataclass
class DepthGroup:
    """Parameters of one depth slice of the plain timm model (stem, a stage or block, the head), by name."""

    index: int
    name: str
    params: list[str]


@dataclass
class Backbone:
    model: nn.Module
    name: str
    groups: list[DepthGroup]
    data_config: dict[str, Any]
    weights: str = "random"
    bn_groups: dict[str, int] = field(default_factory=dict)  # BatchNorm module name -> group index
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # create_model arguments beyond name/num_classes
    new_head: bool = False  # the classifier was created for this task (pretrained body, no pretrained head)
    classifier: str = ""  # module name of the classifier (timm's get_classifier())


def depth_groups(model: nn.Module) -> list[DepthGroup]:
    """Input-to-output depth groups from ``group_matcher(coarse=True)``: stem/embedding, stages (CNNs) or blocks
    (ViTs), then the classifier as its own last group. timm folds a final norm (ViT ``norm``) or
    ``conv_head``/``bn2`` (EfficientNet) into the last block; we keep that. The one generic rule on top: the
    parameters of ``model.get_classifier()`` form the head group, and anything else timm grouped with them joins
    the group before it."""
    classifier = _classifier_name(model)
    head = {n for n, _ in model.named_parameters() if is_under(n, classifier)}
    grouped = group_parameters(model, model.group_matcher(coarse=True))
    body = [[n for n in names if n not in head] for _, names in sorted(grouped.items())]
    body = [names for names in body if names]
    last_timm = grouped[max(grouped)]
    if len(body) > 1 and any(n in head for n in last_timm) and set(body[-1]) <= set(last_timm):
        body[-2].extend(body.pop())  # leftovers of timm's head group (e.g. fc_norm) join the last block
    groups = [DepthGroup(i, "stem" if i == 0 else f"block{i}", names) for i, names in enumerate(body)]
    ordered_head = [n for n, _ in model.named_parameters() if n in head]
    return groups + [DepthGroup(len(groups), "head", ordered_head)]


def _classifier_name(model: nn.Module) -> str:
    classifier = model.get_classifier()
    return next(name for name, m in model.named_modules() if m is classifier)


def bn_group_index(model: nn.Module, groups: list[DepthGroup]) -> dict[str, int]:
    """Map every BatchNorm module of the plain model to the depth group holding its affine weight."""
    owner = {p: g.index for g in groups for p in g.params}
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            key = f"{name}.weight" if f"{name}.weight" in owner else next(
                (p for p in owner if is_under(p, name.rsplit(".", 1)[0])), None)
            if key is None:
                raise RuntimeError(f"cannot place BatchNorm {name!r} in a depth group")
            out[name] = owner[key]
    return out


def _create(name: str, num_classes: int, image_size: int | None, kwargs: dict) -> tuple[nn.Module, dict]:
    from timm.models import parse_model_name

    try:
        parse_model_name(name)
    except ValueError:  # timm: a bare path or repo id
        raise UsageError(f"backbone.name={name!r} is a path or hub repo id, not a timm model name: pass "
                         f"backbone.name=local-dir:{name} (a folder holding config.json and weights) or "
                         f"hf-hub:{name}") from None
    try:
        if image_size:
            try:  # ViTs are built for one input size: position embeddings sized for image_size
                sized = {**kwargs, "img_size": int(image_size)}
                return timm.create_model(name, pretrained=False, num_classes=num_classes, **sized), sized
            except TypeError as e:
                if "img_size" not in str(e):
                    raise
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs), kwargs
    except RuntimeError as e:
        if "Unknown model" not in str(e):
            raise
        close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=6, cutoff=0.6)
        raise UsageError(f"unknown timm model {name!r} (backbone.name). Similar timm models: {close}. "
                         f"Presets: see conf/backbone/ or `python -m visionft --help`") from None


def listed_name(name: str, model: nn.Module) -> str:
    """The name a checkpoint records for ``name``: itself, or for a name with a source (``local-dir:DIR``,
    ``hf-hub:repo``, the user's own choice) the timm architecture and tag its config built, so that rebuilding from
    the checkpoint never follows a folder or repo it names (``checkpoints.stored_timm_name``)."""
    from timm.models import parse_model_name

    if parse_model_name(name)[0] is None:
        return name
    listed = ".".join(filter(None, (model.pretrained_cfg.get("architecture"), model.pretrained_cfg.get("tag"))))
    log.info("backbone %s is timm model %s: checkpoints record that name", name, listed)
    return listed


def create_backbone(
    name: str,
    num_classes: int,
    *,
    pretrained: bool = True,
    checkpoint: str | None = None,
    image_size: int | None = None,
    kwargs: dict | None = None,
    head_init: str = "zero",
) -> Backbone:
    """Build timm model ``name`` with a ``num_classes`` head and load its weights: ``checkpoint`` (a local file)
    wins over ``pretrained`` (offline package, local cache, then hub); neither means random init.

    A head created for this task on top of loaded weights starts at zero (``head_init="zero"``, as BiT and most
    fine-tuning recipes do): the first loss is ln(num_classes) and the backbone's first gradients are not noise
    from a random head, which on real data wrecked the pretrained features (timm's EfficientNet head init gave a
    first loss of 28 on 2 classes). ``head_init="timm"`` keeps the architecture's own init."""
    if head_init not in HEAD_INITS:
        raise UsageError(f"backbone.head_init={head_init!r} is not a head init; valid: {', '.join(HEAD_INITS)}")
    refuse_loading_kwargs(dict(kwargs or {}), "backbone.kwargs")
    model, used_kwargs = _create(name, num_classes, image_size, dict(kwargs or {}))
    initial = {k: p.detach().clone() for k, p in model.get_classifier().named_parameters()}
    if checkpoint:
        apply_state_dict(model, load_state_dict_file(checkpoint), str(checkpoint))
        weights = f"checkpoint:{checkpoint}"
    elif pretrained:
        weights = load_pretrained(model, name)
    else:
        weights = "random"
    head = dict(model.get_classifier().named_parameters())
    new_head = weights != "random" and bool(head) and all(torch.equal(initial[k], p) for k, p in head.items())
    if new_head and head_init == "zero":
        with torch.no_grad():
            for p in head.values():
                p.zero_()
    data_config = resolve_data_config(model=model)
    if image_size:
        data_config["input_size"] = (3, int(image_size), int(image_size))
    groups = depth_groups(model)
    return Backbone(model, listed_name(name, model), groups, data_config, weights, bn_group_index(model, groups),
                    used_kwargs, new_head, _classifier_name(model))
