"""A quantized frozen base under low-rank adapters (QLoRA, Dettmers et al. 2023), through bitsandbytes.

``strategy=lora strategy.quantize=nf4`` replaces every ``nn.Linear`` of the backbone outside the head by
bitsandbytes' 4-bit NormalFloat layer (blocks of 64 weights, double-quantized block scales); ``int8`` by its
LLM.int8() layer (per-row int8 weights; activations quantized per row too, with fp16 outliers above the threshold).
peft then wraps the quantized layers as it wraps float ones; the adapters and the head train in full precision.
Convolutions stay in float (bitsandbytes quantizes linear layers only), so the saving is a ViT's (ViT, DINOv2, CLIP:
nearly all their weights are linear); a backbone with no linear layer outside its head is an error.

For deployment the base is dequantized and the adapters merged into it: a plain float timm model whose weights are
the quantized values the adapters were trained against (``dequantize_linears``)."""
from __future__ import annotations

import logging
import math

from torch import nn

from visionft.errors import UsageError
from visionft.weights import is_under

log = logging.getLogger(__name__)
QUANTIZE = ("nf4", "int8")
MIB = 2 ** 20


def _bnb():
    try:
        import bitsandbytes
    except ImportError:
        raise UsageError("strategy.quantize needs bitsandbytes: pip install 'visionft[quant]' (or drop "
                         "strategy.quantize)") from None
    return bitsandbytes


def _quantized(bnb, linear: nn.Linear, kind: str) -> nn.Module:
    bias, w = linear.bias is not None, linear.weight.detach()
    if kind == "nf4":
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, quant_type="nf4",
                              compress_statistics=True)
        q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True)
        # bitsandbytes' CPU inference layout (bf16 kernels, weights repacked on the first eval call) would make
        # evaluation compute something other than what training computed, and the repacked weight is no longer
        # the one dequantize_4bit reads: keep the one path
        q.support_avx512bf16_for_cpu = False
        q._register_load_state_dict_pre_hook(_load_nf4_state, with_module=True)
    else:
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False)
        q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
        q._register_load_state_dict_pre_hook(_load_int8_state, with_module=True)
        q.register_forward_pre_hook(_int8_on_its_device)
    if bias:
        q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return q.to(w.device)  # bitsandbytes quantizes as the weight moves to its device


def _load_nf4_state(module, state_dict, prefix, *args) -> None:
    """A checkpoint of an NF4 layer carries its quantization state beside the packed weight (``weight.absmax``,
    ``weight.quant_map``, ...): rebuild the weight from them (bitsandbytes' ``from_prequantized``)."""
    import bitsandbytes as bnb

    stats = {k[len(prefix) + 7:]: state_dict.pop(k) for k in list(state_dict) if k.startswith(prefix + "weight.")}
    if stats and prefix + "weight" in state_dict:
        w = module.weight
        module.weight = bnb.nn.Params4bit.from_prequantized(state_dict[prefix + "weight"], stats, requires_grad=False,
                                                            device=w.device, module=module)


def _int8_on_its_device(module, inputs) -> None:
    """LLM.int8 weights quantized on the CPU lose their row scales when ``Module.to`` moves them (torch keeps the old
    parameter object, bitsandbytes' moved scales live on the new one): refuse instead of computing with stale ones."""
    state = module.state.SCB if module.state.SCB is not None else module.weight.SCB
    if state is not None and state.device != inputs[0].device:
        raise UsageError(f"strategy.quantize=int8 runs on the CPU only (its weights were quantized there and their "
                         f"scales do not follow a move to {inputs[0].device}); use strategy.quantize=nf4 on a GPU")


def _load_int8_state(module, state_dict, prefix, *args) -> None:
    """After its first forward an LLM.int8 layer keeps its row scales in ``module.state`` only, and bitsandbytes then
    refuses to load a checkpoint's ``SCB``: hand them back to the weight first."""
    if getattr(module.weight, "SCB", None) is None and module.state.SCB is not None:
        module.weight.SCB = module.state.SCB


def logical_numel(param) -> int:
    """Weights a parameter stands for: a packed NF4 weight knows its unpacked shape."""
    state = getattr(param, "quant_state", None)
    return math.prod(state.shape) if state is not None else param.numel()


def base_bytes(model: nn.Module, skip: str) -> int:
    """Bytes held by the parameters and buffers outside module ``skip`` (the head), quantization state included."""
    seen, total = set(), 0
    outside = [t for n, t in [*model.named_parameters(), *model.named_buffers()] if not is_under(n, skip)]
    for t in outside:
        state = getattr(t, "quant_state", None)
        extra = [state.absmax, getattr(state, "state2", None) and state.state2.absmax, state.code] if state else []
        for x in [t, getattr(t, "SCB", None), *extra]:
            if x is not None and id(x) not in seen:
                seen.add(id(x))
                total += x.numel() * x.element_size()
    return total


def _not_the_cast_notice(record: logging.LogRecord) -> bool:
    return "inputs will be cast from" not in record.getMessage()


def quantize_linears(model: nn.Module, kind: str, skip: str) -> list[str]:
    """Replace every ``nn.Linear`` outside module ``skip`` (the head) by its quantized form; returns their names."""
    if kind not in QUANTIZE:
        raise UsageError(f"strategy.quantize={kind!r} is not a quantization; valid: {', '.join(QUANTIZE)} (or null)")
    bnb = _bnb()
    names = [n for n, m in model.named_modules()
             if type(m) is nn.Linear and not is_under(n, skip)]
    if not names:
        raise UsageError(f"strategy.quantize={kind} quantizes linear layers, and {type(model).__name__} has none "
                         f"outside its head: use a ViT-family backbone (vit_small, dinov2_small, clip_vit_b16) or "
                         f"drop strategy.quantize")
    if kind == "int8":  # LLM.int8 casts activations to float16 by design; bitsandbytes logs it on every call
        logging.getLogger("bitsandbytes.autograd._functions").addFilter(_not_the_cast_notice)
    before = base_bytes(model, skip)
    for name in names:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, _quantized(bnb, model.get_submodule(name), kind))
    log.info("quantized %d linear layers to %s: frozen base %.1f MiB (float32 %.1f MiB, bfloat16 %.1f MiB)",
             len(names), kind, base_bytes(model, skip) / MIB, before / MIB, before / 2 / MIB)
    return names


def dequantize_linears(model: nn.Module) -> nn.Module:
    """Replace every bitsandbytes layer by an ``nn.Linear`` holding its dequantized weight (in place)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return model
    from peft.utils.integrations import dequantize_module_weight

    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]:
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.weight.device)
        plain.weight = nn.Parameter(dequantize_module_weight(m).float().detach(), requires_grad=False)
        if m.bias is not None:
            plain.bias = nn.Parameter(m.bias.detach().float(), requires_grad=False)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, plain)
    return model
