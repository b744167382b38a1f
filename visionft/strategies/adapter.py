"""Bottleneck adapters: a small down-projection, a ReLU and a zero-initialized up-projection in every block of the
frozen backbone; adapters and the head train.

- ``placement=parallel`` (AdaptFormer, Chen et al. 2022; the parallel adapter of He et al. 2022): beside the MLP of
  every transformer block, reading the MLP's input, ``mlp(h) + scale * up(relu(down(h)))``.
- ``placement=sequential`` (Houlsby et al. 2019 in the Pfeiffer placement: after the MLP only):
  ``y = mlp(h); y + scale * up(relu(down(y)))``.

Convnets (ResNet, EfficientNet) get the convolutional form (Conv-Adapter, Chen et al. 2022): the same bottleneck of
1x1 convolutions around every residual block (parallel: from the block's input, strided like the block).
``up`` starts at zero, so training starts from the pretrained function; ``down`` uses LoRA's Kaiming-uniform init,
as AdaptFormer does. The ReLU keeps adapters from being merged into the frozen layers: the deployable model is the
adapted model itself (it exports to TorchScript, ONNX and ExportedProgram with the usual parity check)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from visionft.adapted import Adapted
from visionft.errors import UsageError
from visionft.strategies.base import Strategy, train_only_head, write_safetensors

# Where adapters go per timm model class (regex, full match on module names): a transformer block's MLP, or a
# convnet's residual block.
DEFAULT_SITES = {
    "VisionTransformer": r"blocks\.\d+\.mlp",
    "Eva": r"blocks\.\d+\.mlp",
    "ResNet": r"layer\d+\.\d+",
    "EfficientNet": r"blocks\.\d+\.\d+",
}
PLACEMENTS = ("parallel", "sequential")
NAME = "ft_adapter"  # the child module each adapted block gets


class Bottleneck(nn.Module):
    """down -> ReLU -> up (zero init), times ``scale``; Linear on token features (channels last) or 1x1 convs on
    feature maps (channels first)."""

    def __init__(self, c_in: int, c_out: int, dim: int, scale: float, *, conv: bool, parallel: bool,
                 stride: int = 1) -> None:
        super().__init__()
        self.scale, self.parallel = scale, parallel
        if conv:
            self.down, self.up = nn.Conv2d(c_in, dim, 1, stride=stride), nn.Conv2d(dim, c_out, 1)
        else:
            self.down, self.up = nn.Linear(c_in, dim), nn.Linear(dim, c_out)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(torch.relu(self.down(x))) * self.scale


def _add_adapter(module: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
    adapter = getattr(module, NAME)
    return out + adapter(inputs[0] if adapter.parallel else out)


def _channels_first(module: nn.Module) -> bool:
    """Whether a site's 4-D output is (N, C, H, W): its last layer is a convolution, not a Linear on the last
    dimension (ConvNeXt's MLP works on (N, H, W, C))."""
    layers = [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return not layers or isinstance(layers[-1], nn.Conv2d)


def _shapes(model: nn.Module, names: list[str], input_size) -> dict[str, tuple]:
    """Input and output shapes of the named modules in one forward pass of a single image."""
    modules, seen = dict(model.named_modules()), {}

    def record(name: str):
        def hook(module, inputs, out) -> None:
            seen.setdefault(name, (inputs[0].shape, out.shape))
        return hook

    hooks = [modules[n].register_forward_hook(record(n)) for n in names]
    was_training = model.training
    try:
        with torch.no_grad():
            w = next(model.parameters())
            model.eval()(torch.zeros(1, *input_size, dtype=w.dtype, device=w.device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return seen


@dataclass
class Adapter(Strategy):
    lr: float = 1e-3
    placement: str = "parallel"
    dim: int = 64  # bottleneck width
    scale: float = 1.0  # Houlsby adapters 1.0; AdaptFormer 0.1 (slower to train at the same lr)
    sites: str | None = None  # regex over module names; None: every transformer MLP / residual block

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.placement not in PLACEMENTS:
            raise UsageError(f"strategy.placement={self.placement!r} is not an adapter placement; valid: "
                             f"{', '.join(PLACEMENTS)}")
        if self.dim < 1:
            raise UsageError(f"strategy.dim={self.dim} must be >= 1 (the bottleneck width, e.g. 64)")

    def find_sites(self, model: nn.Module) -> list[str]:
        pattern = self.sites or DEFAULT_SITES.get(type(model).__name__)
        if pattern is None:
            raise UsageError(f"no default adapter sites for {type(model).__name__}: set strategy.sites to a regex "
                             f"over module names (known families: {', '.join(DEFAULT_SITES)})")
        names = [n for n, _ in model.named_modules() if n and re.fullmatch(pattern, n)]
        if not names:
            raise UsageError(f"strategy.sites={pattern!r} matches no module of {type(model).__name__}; module names "
                             f"look like {[n for n, _ in model.named_modules() if n][:6]}")
        return names

    def prepare(self, model: nn.Module, backbone) -> AdapterAdapted:
        train_only_head(model, backbone.classifier)
        names = self.find_sites(model)
        shapes = _shapes(model, names, backbone.data_config["input_size"])
        w = next(model.parameters())
        for name in names:
            if name not in shapes:
                raise UsageError(f"adapter site {name!r} is not called in {type(model).__name__}'s forward pass")
            (i, o), parallel = shapes[name], self.placement == "parallel"
            module = model.get_submodule(name)
            conv = len(o) == 4 and _channels_first(module)  # (N, C, H, W); else channels last (tokens, NHWC MLPs)
            if not conv and parallel and i[:-1] != o[:-1]:
                raise UsageError(f"adapter site {name!r} changes its tokens' layout ({tuple(i)} -> {tuple(o)}): a "
                                 f"parallel adapter cannot follow it; use strategy.placement=sequential")
            c_in, c_out = [s[1] if conv else s[-1] for s in ((i if parallel else o), o)]
            stride = -(-i[-1] // o[-1]) if conv and parallel else 1  # a 3 px map halves to 2: stride 2
            adapter = Bottleneck(c_in, c_out, self.dim, self.scale, conv=conv, parallel=parallel, stride=stride)
            module.add_module(NAME, adapter.to(w.device, w.dtype))
            module.register_forward_hook(_add_adapter)
        return AdapterAdapted(model, backbone, with_bn_stats=self.bn == "train")

    def save_artifacts(self, adapted: AdapterAdapted, out) -> list:
        """``adapters.safetensors``: the adapters and the head (load onto a fresh backbone wrapped by ``prepare``)."""
        return [write_safetensors(adapted.artifact_state(), out / "adapters.safetensors", "adapters file")]


class AdaptedNet(nn.Module):
    """The deployable model: the timm model with its adapters, under a name that says it is no longer a plain timm
    model (export then ships the traced/exported artifact and ``config.json``, not a ``model.safetensors`` that
    ``timm.create_model`` would reject for its extra keys)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.pretrained_cfg, self.num_classes = model.pretrained_cfg, model.num_classes  # for export's config.json
        self.num_features = model.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class AdapterAdapted(Adapted):
    """Adapter parameters belong to the depth group of the block they adapt; deployment keeps them (not mergeable)."""

    def __init__(self, model: nn.Module, backbone, with_bn_stats: bool = False) -> None:
        super().__init__(model, backbone)
        self.with_bn_stats = with_bn_stats

    def plain_name(self, name: str) -> str | None:
        return None if f".{NAME}." in f".{name}" else name

    def to_deployable(self) -> nn.Module:
        return AdaptedNet(self.model)

    def artifact_state(self) -> dict:
        """Adapters and head [+ BatchNorm statistics when BatchNorm trained]."""
        state = {n: p.detach() for n, p in self.model.named_parameters() if self.trainable(n)}
        if self.with_bn_stats:
            state.update({k: v for k, v in self.model.state_dict().items()
                          if k.endswith(("running_mean", "running_var", "num_batches_tracked"))})
        return state

    def wise_anchor(self, start: dict, end: dict) -> dict:
        """With ``up`` at zero, ``down``'s random start is not part of the function: keep ``down`` as trained, so
        interpolating scales what the adapters add."""
        return {k: end[k] if f".{NAME}.down." in f".{k}" else v for k, v in start.items()}
