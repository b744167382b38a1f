"""The adapter contract: what a strategy's ``prepare()`` returns, so that no core module knows any wrapper (low-rank
adapters, prompt tokens, bottleneck adapters) by name.

``Adapted`` holds the module to train and answers, for every parameter and BatchNorm of it:

- ``plain_name(name)``: its name in the plain timm model (``None`` for a part the wrapper added);
- ``depth_of(name)``: its depth group; an added part belongs to the group of the module it adapts (its longest
  plain-model prefix) unless the wrapper says otherwise;
- ``trainable(name)``: whether the strategy ever trains it (the gates only narrow this);
- ``duplicate(name)``: a frozen copy the wrapper keeps of another parameter (not counted twice);
- ``numel(name, param)``: how many parameters it holds (packed quantized weights hold more than their elements);
- ``to_deployable()``: a plain ``nn.Module`` for export (merged where possible; otherwise the wrapped module);
- ``artifact_state()``: the tensors of a strategy's small artifact file (``None``: no artifact);
- ``wise_anchor(start, end)``: the state WiSE-FT interpolates from (``visionft.wise``): by default the state at the
  start of fit; a wrapper replaces entries whose starting value does not change the function (a low-rank
  adapter's down-projection while its up-projection is zero), so that interpolating scales what it added;
- ``wise_chosen(alpha)``: told the alpha WiSE-FT kept (after ``wise_anchor``).

The base class is the identity wrapper: a plain timm model, trained where ``requires_grad`` is set after
``prepare`` (so freezing strategies such as BitFit need no subclass).
"""
from __future__ import annotations

from torch import nn


class Adapted:
    def __init__(self, model: nn.Module, backbone) -> None:
        self.model, self.backbone = model, backbone
        self._trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        self._owner = {p: g.index for g in backbone.groups for p in g.params}
        self._module_owner: dict[str, int] = {}
        for p, i in self._owner.items():
            parts = p.split(".")
            for k in range(len(parts) - 1, 0, -1):
                self._module_owner.setdefault(".".join(parts[:k]), i)

    # -- names and groups -------------------------------------------------------------------------------------
    def plain_name(self, name: str) -> str | None:
        return name

    def depth_of(self, name: str) -> int:
        plain = self.plain_name(name)
        if plain is not None and plain in self._owner:
            return self._owner[plain]
        parts = (plain or name).split(".")
        for k in range(len(parts) - 1, 0, -1):
            hit = self._module_owner.get(".".join(parts[:k]))
            if hit is not None:
                return hit
        raise ValueError(f"parameter {name!r} belongs to no depth group of {self.backbone.name}: the strategy "
                         f"that added it must say where it goes (Adapted.depth_of)")

    def depths(self) -> dict[str, int]:
        return {n: self.depth_of(n) for n, _ in self.model.named_parameters()}

    def bn_depths(self) -> dict[str, int]:
        """Depth group of every BatchNorm module of the trained model."""
        groups = self.backbone.bn_groups
        return {n: groups[self.plain_name(n)] if self.plain_name(n) in groups else self.depth_of(f"{n}.weight")
                for n, m in self.model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}

    # -- what trains, what ships ------------------------------------------------------------------------------
    def trainable(self, name: str) -> bool:
        return name in self._trainable

    def duplicate(self, name: str) -> bool:
        return False

    def numel(self, name: str, param) -> int:
        """How many parameters a tensor holds (a wrapper that packs them, e.g. two 4-bit weights per byte, says)."""
        return param.numel()

    def to_deployable(self) -> nn.Module:
        return self.model

    def artifact_state(self) -> dict | None:
        return None

    def wise_anchor(self, start: dict, end: dict) -> dict:
        return start

    def wise_chosen(self, alpha: float) -> None:
        pass
