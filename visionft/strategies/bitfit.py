"""BitFit (Ben Zaken et al., 2022): only the bias terms train (and the new head); ``norm=True`` also trains the
affine weights of normalization layers. The backbone stays a plain timm model, so it deploys as it is."""
from __future__ import annotations

from dataclasses import dataclass

from timm.layers import RmsNorm
from torch import nn

from visionft.adapted import Adapted
from visionft.strategies.base import Strategy
from visionft.weights import is_under

NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, RmsNorm)


@dataclass
class BitFit(Strategy):
    lr: float = 1e-3
    norm: bool = False  # also train norm layers' affine weights (BatchNorm/LayerNorm/GroupNorm gamma)

    def prepare(self, model: nn.Module, backbone) -> Adapted:
        norms = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, NORMS)} if self.norm else set()
        head = {n for n, _ in model.named_parameters() if is_under(n, backbone.classifier)}
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith("bias") or name in norms or name in head)  # incl. q_bias/v_bias (BEiT, EVA)
        return Adapted(model, backbone)
