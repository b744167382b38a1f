"""LoRA and DoRA through peft: low-rank adapters on attention (ViT, DINOv2, CLIP) or convolutions (ResNet block
convs, EfficientNet pointwise convs); the head trains in full (peft ``modules_to_save``). The adapter, the head and,
if BatchNorm trains, its statistics are saved alone as a small safetensors file that reloads onto a fresh backbone."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from visionft.adapted import Adapted
from visionft.errors import UsageError
from visionft.strategies.base import Strategy, write_safetensors
from visionft.strategies.quantize import QUANTIZE, dequantize_linears, logical_numel, quantize_linears

# Default targets per timm model class (regex, full match on module names of the plain timm model).
DEFAULT_TARGETS = {
    "VisionTransformer": r"blocks\.\d+\.attn\.(qkv|proj)",
    "Eva": r"blocks\.\d+\.attn\.(qkv|q_proj|k_proj|v_proj|proj)",
    "ResNet": r"layer\d+\.\d+\.conv[1-3]",  # block convs; avoids a deep stem's nn.Sequential named conv1
    "EfficientNet": r"blocks\.\d+\.\d+\.(conv_pw|conv_pwl)",  # pointwise only: peft cannot merge depthwise convs
}
ADAPTER_FILE, ADAPTER_CONFIG = "adapter.safetensors", "adapter_config.json"


@dataclass
class PeftTuner(Strategy):
    """A strategy that wraps the model in a peft tuner (``PeftAdapted``): after the run it writes the peft adapter
    (``adapter.safetensors`` + ``adapter_config.json``)."""

    def save_artifacts(self, adapted: PeftAdapted, out: Path) -> list[Path]:
        return [*save_adapter(adapted.model, out, adapted.artifact_state())]


@dataclass
class Lora(PeftTuner):
    lr: float = 1e-3
    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    use_dora: bool = False
    target_modules: str | list[str] | None = None  # None: DEFAULT_TARGETS for the backbone's family
    loraplus_ratio: float = 1.0  # LoRA+: the B matrices get lr x ratio (e.g. 16); 1.0 = off
    # nf4 | int8: a quantized frozen base (QLoRA, bitsandbytes; visionft.strategies.quantize)
    quantize: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.quantize is not None and self.quantize not in QUANTIZE:
            raise UsageError(f"strategy.quantize={self.quantize!r} is not a quantization; valid: "
                             f"{', '.join(QUANTIZE)} (or null)")

    def lr_scale(self, index: int, n_groups: int, param_name: str) -> float:
        scale = super().lr_scale(index, n_groups, param_name)
        return scale * self.loraplus_ratio if ".lora_B." in param_name else scale

    def targets(self, model: nn.Module) -> list[str]:
        return find_targets(model, self.target_modules)

    def peft_config(self, model: nn.Module, classifier: str):
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, use_dora=self.use_dora,
                          target_modules=self.targets(model), modules_to_save=[classifier])

    def prepare(self, model: nn.Module, backbone) -> PeftAdapted:
        from peft import get_peft_model

        if self.quantize:
            quantize_linears(model, self.quantize, backbone.classifier)
        return PeftAdapted(get_peft_model(model, self.peft_config(model, backbone.classifier)), backbone,
                           with_bn_stats=self.bn == "train")


def find_targets(model: nn.Module, target_modules: str | list[str] | None) -> list[str]:
    """Names of the modules a peft tuner adapts (``target_modules``: a regex, a list of names, or None for the
    family default); errors name the problem (no match, grouped convolutions)."""
    pattern = target_modules or DEFAULT_TARGETS.get(type(model).__name__)
    if pattern is None:
        raise UsageError(f"no default LoRA targets for {type(model).__name__}: set strategy.target_modules to a "
                         f"regex over module names (known families: {', '.join(DEFAULT_TARGETS)})")
    if isinstance(pattern, str):
        names = [n for n, _ in model.named_modules() if re.fullmatch(pattern, n)]
    else:
        names = [n for n, _ in model.named_modules() if any(n == p or n.endswith("." + p) for p in pattern)]
    if not names:
        examples = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))][:6]
        raise UsageError(f"strategy.target_modules={pattern!r} matches no module of {type(model).__name__}; "
                         f"module names look like {examples}")
    modules = dict(model.named_modules())
    grouped = [n for n in names if isinstance(modules[n], nn.Conv2d) and modules[n].groups > 1]
    if grouped:
        raise UsageError(f"LoRA targets include grouped/depthwise convolutions {grouped[:3]}: peft needs the rank "
                         f"to be a multiple of their groups and cannot merge them; target pointwise convs instead")
    return names


# peft's wrapping of a timm model's names: base_model.model.<name>, <layer>.base_layer.<p>, the trained head copy
# <head>.modules_to_save.default.<p> and its frozen original <head>.original_module.<p>
_PEFT_PARTS = ("base_model.model.", ".base_layer", ".modules_to_save.default", ".original_module")


class PeftAdapted(Adapted):
    """A peft-wrapped timm model: what a tuner adds to a layer (LoRA A/B, DoRA magnitudes, LoHa/LoKr factors, IA3
    vectors, ... — the names each peft tuner layer declares in ``adapter_layer_names``) belongs to the depth group
    of the layer it adapts."""

    def __init__(self, model: nn.Module, backbone, with_bn_stats: bool) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.adapter_parts = {f".{a}." for m in model.modules() if isinstance(m, BaseTunerLayer)
                              for a in m.adapter_layer_names}
        super().__init__(model, backbone)
        self.with_bn_stats = with_bn_stats
        self.on_merged_line = self.base_in_artifact = False

    def _strip(self, name: str) -> str:
        for part in _PEFT_PARTS:
            name = name.replace(part, "")
        return name

    def _adapter_at(self, name: str) -> int:
        """Where the adapter part of a parameter name starts (-1: not an adapter parameter)."""
        return min((i for i in (name.find(p) for p in self.adapter_parts) if i >= 0), default=-1)

    def plain_name(self, name: str) -> str | None:
        name = self._strip(name)
        return None if self._adapter_at(name) >= 0 else name

    def depth_of(self, name: str) -> int:
        name = self._strip(name)
        at = self._adapter_at(name)
        return super().depth_of(name[:at] + ".weight" if at >= 0 else name)

    def duplicate(self, name: str) -> bool:
        return ".original_module." in name

    def numel(self, name: str, param) -> int:
        return logical_numel(param)  # 4-bit weights of a quantized base: two per stored byte

    def to_deployable(self) -> nn.Module:
        dequantize_linears(self.model)  # a quantized base (strategy.quantize) back to float, then the merge
        return self.model.merge_and_unload()  # a plain timm model with the adapters folded into its weights

    def wise_anchor(self, start: dict, end: dict) -> dict:
        """LoRA: B starts at zero, so A's starting value is arbitrary: anchoring A at its trained value makes the
        interpolation alpha * B @ A, i.e. alpha scales the adapter (DoRA magnitudes interpolate from their start).
        Other tuners (LoHa, LoKr, OFT, ...): the straight line of the merged weights (``_merged_line_anchor``)."""
        if str(self.model.peft_config["default"].peft_type).rsplit(".", 1)[-1] != "LORA":
            return self._merged_line_anchor(start, end)
        return {k: end[k] if "lora_A" in k or "lora_embedding_A" in k else v for k, v in start.items()}

    def _merged_line_anchor(self, start: dict, end: dict) -> dict:
        """W0 + alpha * dW for each adapted weight W0, dW = merged trained weight - W0, whatever the factors: they
        stay as trained, and the base weight starts at B, the weight that merges to W0 (peft's unmerge applied to
        W0). A merge is affine in the base weight (W + dW, R @ W, W * l), so lerp(B, W0, alpha) merges to
        lerp(W0, W0 + dW, alpha). Reads the live model, which holds ``end``; the artifact then carries the base
        weights, unless alpha 1 is chosen."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        anchor = {k: end[k] if self._adapter_at(self._strip(k)) >= 0 else v for k, v in start.items()}
        with torch.no_grad():
            for name, layer in self.model.named_modules():
                key = f"{name}.base_layer.weight"
                if not isinstance(layer, BaseTunerLayer) or key not in start:
                    continue
                weight = layer.get_base_layer().weight
                w0 = weight.detach().clone()
                layer.merge()
                weight.copy_(w0)  # "merged" W0: unmerging it gives B
                layer.unmerge()
                anchor[key] = weight.detach().clone()
                weight.copy_(w0)
                self.on_merged_line = True
        return anchor

    def wise_chosen(self, alpha: float) -> None:
        self.base_in_artifact = self.on_merged_line and alpha < 1  # alpha 1: the base weights are the pretrained ones

    def artifact_state(self) -> dict:
        """The adapters and the head (peft's own selection) [+ BatchNorm statistics if BatchNorm trained] [+ the
        adapted layers' base weights once WiSE-FT moved them along the merged line]."""
        from peft import get_peft_model_state_dict

        sd = dict(get_peft_model_state_dict(self.model))
        keep = (_BN_STATS if self.with_bn_stats else ()) + ((_BASE,) if self.base_in_artifact else ())
        if keep:
            sd.update({k: v for k, v in self.model.state_dict().items() if k.endswith(keep)})
        return sd


_BN_STATS = ("running_mean", "running_var", "num_batches_tracked")
_BASE = ".base_layer.weight"  # an adapted layer's own weight (in an artifact after WiSE-FT's merged line)


def save_adapter(model: nn.Module, out: Path, state: dict) -> tuple[Path, Path]:
    """Write the adapter state as safetensors and its peft config beside it."""
    from visionft.atomic import write_text

    write_safetensors(state, out / ADAPTER_FILE, "adapter")
    config = model.peft_config["default"].to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    write_text(out / ADAPTER_CONFIG, json.dumps(config, indent=2, default=str), "adapter config")
    return out / ADAPTER_FILE, out / ADAPTER_CONFIG


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Apply a saved adapter to a freshly built plain timm model (the same backbone and pretrained weights)."""
    from peft import get_peft_model, set_peft_model_state_dict
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from safetensors.torch import load_file

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    cfg = json.loads((folder / ADAPTER_CONFIG).read_text())
    config_cls = PEFT_TYPE_TO_CONFIG_MAPPING[str(cfg.get("peft_type", "LORA")).rsplit(".", 1)[-1]]
    known = set(config_cls.__dataclass_fields__)
    config = config_cls(**{k: v for k, v in cfg.items() if k in known and k not in ("peft_type", "task_type")})
    peft_model = get_peft_model(model, config)
    sd = load_file(str(folder / ADAPTER_FILE))
    own = {k: v for k, v in sd.items() if k.endswith((*_BN_STATS, _BASE))}  # the model's own tensors, not peft's
    result = set_peft_model_state_dict(peft_model, {k: v for k, v in sd.items() if k not in own})
    if getattr(result, "unexpected_keys", None):
        raise UsageError(f"adapter {folder} does not fit this model: unexpected {result.unexpected_keys[:5]}")
    if own:
        missing = set(own) - set(peft_model.state_dict())
        if missing:
            raise UsageError(f"adapter {folder} has BatchNorm statistics or base weights this model lacks: "
                             f"{sorted(missing)[:5]}")
        peft_model.load_state_dict(own, strict=False)
    return peft_model
