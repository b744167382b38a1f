"""Any peft tuner by name (``strategy=peft strategy.method=loha|lokr|oft|boft|ia3|vera|fourierft|...``), its options
passed through (``strategy.options``), on the same targets as LoRA (or ``strategy.target_modules``); the head trains
in full. Everything else (depth groups, artifacts, merging for export, reloading) is LoRA's peft wrapping."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from visionft.errors import UsageError
from visionft.strategies.lora import PeftAdapted, PeftTuner, find_targets

# peft methods that adapt a model's own layers (prompt-learning and multi-adapter methods are not for a timm model)
NOT_LAYER_TUNERS = {"ADAPTION_PROMPT", "PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "CPT",
                    "XLORA", "POLY", "TRAINABLE_TOKENS", "CARTRIDGE"}


def methods() -> dict[str, type]:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    return {str(k.value if hasattr(k, "value") else k).lower(): v for k, v in PEFT_TYPE_TO_CONFIG_MAPPING.items()
            if str(k.value if hasattr(k, "value") else k) not in NOT_LAYER_TUNERS}


@dataclass
class Peft(PeftTuner):
    lr: float = 1e-3
    method: str = "loha"
    options: dict = field(default_factory=dict)  # the method's own config fields (peft's names), e.g. {r: 8}
    target_modules: str | list[str] | None = None  # None: LoRA's default targets for the backbone's family

    def peft_config(self, model: nn.Module, classifier: str):
        known = methods()
        config_cls = known.get(str(self.method).lower())
        if config_cls is None:
            raise UsageError(f"strategy.method={self.method!r} is not a peft method that adapts layers; choose one "
                             f"of {', '.join(sorted(known))}")
        fields = set(config_cls.__dataclass_fields__)
        unknown = sorted(set(self.options) - fields)
        if unknown:
            raise UsageError(f"strategy.options {unknown} are not options of peft's {config_cls.__name__}; "
                             f"its options: {', '.join(sorted(f for f in fields if not f.startswith('_')))}")
        targets = find_targets(model, self.target_modules)
        return config_cls(**{"target_modules": targets, "modules_to_save": [classifier], **dict(self.options)})

    def prepare(self, model: nn.Module, backbone) -> PeftAdapted:
        from peft import get_peft_model

        config = self.peft_config(model, backbone.classifier)
        try:
            wrapped = get_peft_model(model, config)
        except (ValueError, TypeError, NotImplementedError) as e:  # peft's own refusal: the layer types it supports
            modules = dict(model.named_modules())
            kinds = sorted({type(modules[n]).__name__ for n in config.target_modules})
            raise UsageError(f"peft's {self.method} refused the targets of {type(model).__name__} ({', '.join(kinds)}"
                             f"): {str(e).strip().splitlines()[0]} Set strategy.target_modules to layers it supports, "
                             f"or pass the option it names in strategy.options") from None
        return PeftAdapted(wrapped, backbone, with_bn_stats=self.bn == "train")
