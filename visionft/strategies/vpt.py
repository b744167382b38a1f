"""Visual prompt tuning (Jia et al., 2022) for ViT-family backbones (timm ``VisionTransformer``: ViT, DINOv2, CLIP).
``tokens`` learnable prompt tokens are inserted after the class/register tokens; ``deep=False`` (VPT-shallow,
"prompt tuning") adds them at the input of the first block only, ``deep=True`` (VPT-deep, the vision form of prefix
tuning) gives every block fresh tokens that replace the previous block's. The backbone is frozen; prompts and the
head train. The prompts are dropped before the final norm and pooling, so token or average pooling see the same
tokens as the plain model. The prompted model exports as it is (TorchScript, ONNX, ExportedProgram)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from visionft.adapted import Adapted
from visionft.errors import UsageError
from visionft.strategies.base import Strategy, train_only_head, write_safetensors


class PromptedViT(nn.Module):
    def __init__(self, vit: nn.Module, tokens: int, deep: bool) -> None:
        super().__init__()
        self.vit, self.tokens, self.deep = vit, tokens, deep
        n = len(vit.blocks) if deep else 1
        patch = math.prod(vit.patch_embed.patch_size)
        bound = math.sqrt(6.0 / (3 * patch + vit.embed_dim))  # the paper's Xavier-uniform over (3 x patch, dim)
        self.prompts = nn.ParameterList(
            [nn.Parameter(torch.empty(tokens, vit.embed_dim).uniform_(-bound, bound)) for _ in range(n)])
        self.pretrained_cfg, self.num_classes = vit.pretrained_cfg, vit.num_classes  # for export's config.json
        self.num_features = vit.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v, prefix = self.vit, self.vit.num_prefix_tokens
        x = v.norm_pre(v.patch_drop(v._pos_embed(v.patch_embed(x))))
        for i, block in enumerate(v.blocks):
            if i == 0 or self.deep:
                p = self.prompts[i if self.deep else 0].unsqueeze(0).expand(x.shape[0], -1, -1).to(x.dtype)
                rest = x[:, prefix:] if i == 0 else x[:, prefix + self.tokens:]
                x = torch.cat([x[:, :prefix], p, rest], dim=1)
            x = block(x)
        x = torch.cat([x[:, :prefix], x[:, prefix + self.tokens:]], dim=1)
        return v.forward_head(v.norm(x))


class PromptAdapted(Adapted):
    """Prompt tokens of block k belong to the depth group of block k; the ViT's own names sit under ``vit.``."""

    def plain_name(self, name: str) -> str | None:
        return name[4:] if name.startswith("vit.") else None

    def artifact_state(self) -> dict:
        """The prompts and the head: all a task adds to the shared frozen backbone."""
        return {n: p.detach() for n, p in self.model.named_parameters() if self.trainable(n)}

    def wise_anchor(self, start: dict, end: dict) -> dict:
        """Random initial prompts are not the pretrained function: the prompts stay as trained, the rest (frozen)
        interpolates, so every alpha is the same model and a run refuses ``wise.alphas`` (``same_at_every_alpha``)."""
        return {k: end[k] if k.startswith("prompts.") else v for k, v in start.items()}

    def depth_of(self, name: str) -> int:
        if name.startswith("prompts."):
            return self._module_owner[f"blocks.{int(name.split('.')[1])}"]
        return super().depth_of(name)


@dataclass
class Vpt(Strategy):
    lr: float = 1e-2
    tokens: int = 10  # prompt tokens per prompted block
    deep: bool = False  # False: input layer only (VPT-shallow); True: fresh tokens at every block (VPT-deep)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tokens < 1:
            raise UsageError(f"strategy.tokens={self.tokens} must be >= 1")

    def prepare(self, model: nn.Module, backbone) -> PromptAdapted:
        from timm.models.vision_transformer import VisionTransformer

        if not isinstance(model, VisionTransformer):  # (Eva/RoPE ViTs embed positions differently)
            raise UsageError(f"strategy=vpt needs a ViT-family backbone (timm VisionTransformer: ViT, DINOv2, CLIP), "
                             f"not {type(model).__name__}: pick e.g. backbone=vit_small, or strategy=lora for convnets")
        train_only_head(model, backbone.classifier)
        return PromptAdapted(PromptedViT(model, self.tokens, self.deep), backbone)

    def save_artifacts(self, adapted: PromptAdapted, out) -> list:
        """``prompts.safetensors``: the prompts and the head (load onto a fresh backbone wrapped by ``prepare``)."""
        return [write_safetensors(adapted.artifact_state(), out / "prompts.safetensors", "prompts file")]
