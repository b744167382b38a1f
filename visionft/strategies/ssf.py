"""SSF (Lian et al., 2022, "Scaling & Shifting Your Features"): a learned per-channel scale and shift after every
linear, convolution and normalization layer of the frozen backbone; the head trains in full. Scales start at 1 and
shifts at 0, so training starts from the pretrained model. For deployment each scale/shift is folded into the layer
it follows (W' = s * W, b' = s * b + t): a plain timm model, zero inference overhead (export checks the parity).

Each layer gets its scale and shift on the channel axis its own weight acts on: dim 1 for convolutions and the norms
of NCHW maps (BatchNorm, GroupNorm, timm's LayerNorm2d/RmsNorm2d, though LayerNorm2d derives from ``nn.LayerNorm``),
the last dim for linear layers and token norms (LayerNorm, RmsNorm). A shift goes only where the layer's forward
applies a bias (a ``bias`` slot, set or None, that the fold can fill): RMS norms, which have none, get a scale only.
Normalization layers fused with an activation (timm's BatchNormAct2d) are skipped: a scale after the activation
could not be folded; the convolution before each of them carries one."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from timm.layers import (
    LayerNorm2d,
    LayerNorm2dFp32,
    LayerNormAct2d,
    LayerNormAct2dFp32,
    RmsNorm,
    RmsNorm2d,
    RmsNorm2dFp32,
    RmsNormFp32,
    SimpleNorm,
    SimpleNorm2d,
    SimpleNorm2dFp32,
    SimpleNormFp32,
)
from timm.layers.norm import LayerNormExp2d
from torch import nn

from visionft.adapted import Adapted
from visionft.strategies.base import Strategy, train_only_head
from visionft.weights import is_under

# channels on dim 1 of the output; checked first: timm's NCHW LayerNorms are subclasses of nn.LayerNorm
CHANNEL_FIRST = (nn.Conv2d, nn.modules.batchnorm._BatchNorm, nn.GroupNorm, LayerNorm2d, LayerNorm2dFp32,
                 LayerNormAct2d, LayerNormAct2dFp32, LayerNormExp2d, RmsNorm2d, RmsNorm2dFp32, SimpleNorm2d,
                 SimpleNorm2dFp32)
CHANNEL_LAST = (nn.Linear, nn.LayerNorm, nn.RMSNorm, RmsNorm, RmsNormFp32, SimpleNorm, SimpleNormFp32)
SCALE, SHIFT = "ssf_scale", "ssf_shift"


def _channels(m: nn.Module) -> int | None:
    """Output channels of a layer SSF follows (None: not a target)."""
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
    if isinstance(m, (*CHANNEL_FIRST, *CHANNEL_LAST)) and getattr(m, "weight", None) is not None:
        act = getattr(m, "act", None)  # BatchNormAct2d: normalization, then an activation inside the module
        return None if act is not None and not isinstance(act, nn.Identity) else m.weight.shape[0]
    return None


def _has_bias_slot(m: nn.Module) -> bool:
    """Whether the layer's forward applies a bias (possibly None): where a folded shift can go."""
    return hasattr(m, "bias")


def _scale_shift(m: nn.Module, inputs, out: torch.Tensor) -> torch.Tensor:
    s, t = getattr(m, SCALE), getattr(m, SHIFT, None)
    if isinstance(m, CHANNEL_FIRST) and out.dim() > 2:
        s = s.view(-1, *[1] * (out.dim() - 2))
        t = None if t is None else t.view(-1, *[1] * (out.dim() - 2))
    return out * s if t is None else out * s + t


@dataclass
class Ssf(Strategy):
    lr: float = 5e-3

    def prepare(self, model: nn.Module, backbone) -> SsfAdapted:
        head = backbone.classifier
        train_only_head(model, head)
        for name, m in model.named_modules():
            c = _channels(m)
            if c is None or is_under(name, head):
                continue
            w = next(m.parameters())
            m.register_parameter(SCALE, nn.Parameter(torch.ones(c, dtype=w.dtype, device=w.device)))
            if _has_bias_slot(m):
                m.register_parameter(SHIFT, nn.Parameter(torch.zeros(c, dtype=w.dtype, device=w.device)))
            m.register_forward_hook(_scale_shift)
        return SsfAdapted(model, backbone)


class SsfAdapted(Adapted):
    """Scale/shift vectors belong to the depth group of the layer they follow; deployment folds them in."""

    def plain_name(self, name: str) -> str | None:
        return None if name.endswith((f".{SCALE}", f".{SHIFT}")) else name

    def to_deployable(self) -> nn.Module:
        model = copy.deepcopy(self.model)
        with torch.no_grad():
            for m in model.modules():
                if hasattr(m, SCALE):
                    fold(m)
        return model


def fold(m: nn.Module) -> None:
    """Fold the module's scale (and shift) into its weight (and bias), then drop them and the hook."""
    s, t = getattr(m, SCALE), getattr(m, SHIFT, None)
    delattr(m, SCALE)
    w = m.weight
    w.mul_(s.view(-1, *[1] * (w.dim() - 1)))
    if t is not None:
        delattr(m, SHIFT)
        if m.bias is None:
            m.bias = nn.Parameter(torch.zeros_like(s))
        m.bias.mul_(s).add_(t)
    for key, hook in list(m._forward_hooks.items()):
        if hook is _scale_shift:
            del m._forward_hooks[key]
