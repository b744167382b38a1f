"""The frozen base's memory under ``strategy.quantize`` (``python tools/bench.py --case quant_memory``): for ViT
backbones (random init: the bytes do not depend on the values), the bytes of everything outside the head in float32,
in bfloat16 (the model cast), and after ``Lora(quantize=nf4|int8).prepare`` (bitsandbytes' packed weights and their
block/row scales; the float LoRA adapters excluded: they are not the base)."""
from __future__ import annotations

import torch

from visionft.backbones import create_backbone
from visionft.strategies import Lora
from visionft.strategies.quantize import base_bytes
from visionft.weights import is_under

BACKBONES = ["vit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224"]
COLUMNS = ["backbone", "base_params", "float32_mib", "bfloat16_mib", "nf4_mib", "int8_mib", "nf4_vs_bf16",
           "int8_vs_bf16"]
MIB = 2 ** 20


def _base(name: str, kind: str | None) -> int:
    b = create_backbone(name, 10, pretrained=False)
    if kind == "bf16":
        return base_bytes(b.model.to(torch.bfloat16), b.classifier)
    if kind is None:
        return base_bytes(b.model, b.classifier)
    adapted = Lora(quantize=kind).prepare(b.model, b)
    adapter = sum(p.numel() * p.element_size() for n, p in adapted.model.named_parameters() if "lora_" in n)
    return base_bytes(adapted.model, "base_model.model." + b.classifier) - adapter


def quant_memory_rows(backbones: list[str] | None = None) -> list[dict]:
    rows = []
    for name in backbones or BACKBONES:
        torch.manual_seed(0)
        b = create_backbone(name, 10, pretrained=False)
        params = sum(p.numel() for n, p in b.model.named_parameters() if not is_under(n, b.classifier))
        fp32, bf16, nf4, int8 = (_base(name, k) for k in (None, "bf16", "nf4", "int8"))
        rows.append({"backbone": name, "base_params": params, "float32_mib": round(fp32 / MIB, 1),
                     "bfloat16_mib": round(bf16 / MIB, 1), "nf4_mib": round(nf4 / MIB, 1),
                     "int8_mib": round(int8 / MIB, 1), "nf4_vs_bf16": round(nf4 / bf16, 3),
                     "int8_vs_bf16": round(int8 / bf16, 3)})
    return rows
