"""A quantized frozen base under LoRA (strategy.quantize, bitsandbytes): the base's memory against its float32 size
by the formats' own arithmetic, peft's trainable count unchanged, outputs near the float model's, training that
moves only adapters and head, export of the dequantized merge, and one-line errors."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from visionft.backbones import create_backbone
from visionft.errors import UsageError
from visionft.strategies import Lora
from visionft.strategies.quantize import base_bytes
from visionft.train import train

pytest.importorskip("bitsandbytes")  # a dev dependency: CI installs it


def _vit():
    torch.manual_seed(0)
    return create_backbone("vit_small_patch16_224", 10, pretrained=False, image_size=32)


@pytest.mark.parametrize("kind,bytes_per_weight", [("nf4", 0.5), ("int8", 1.0)])
def test_base_memory_and_trainable_count(kind, bytes_per_weight):
    b, ref = _vit(), _vit()
    linears = [m for n, m in b.model.named_modules() if type(m) is nn.Linear and not n.startswith("head")]
    linear_weights = sum(m.weight.numel() for m in linears)
    float_base = sum(t.numel() * 4 for n, t in [*b.model.named_parameters(), *b.model.named_buffers()]
                     if not n.startswith("head."))
    plain = Lora().prepare(ref.model, ref)
    quantized = Lora(quantize=kind).prepare(b.model, b)
    assert quantized.model.get_nb_trainable_parameters() == plain.model.get_nb_trainable_parameters()  # peft's count
    total = sum(quantized.numel(n, p) for n, p in quantized.model.named_parameters() if not quantized.duplicate(n))
    assert total == sum(p.numel() for n, p in plain.model.named_parameters() if not plain.duplicate(n))
    got = base_bytes(quantized.model, "base_model.model.head")
    payload = float_base - linear_weights * (4 - bytes_per_weight)  # 4-bit / 8-bit weights, the rest float32
    assert payload <= got <= payload + linear_weights * 0.07  # + block/row scales (NF4: ~1 byte per 64 weights)
    assert got < (0.2 if kind == "nf4" else 0.3) * float_base


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_model_stays_close_to_the_float_model(kind):
    b, ref = _vit(), _vit()
    plain = Lora().prepare(ref.model, ref).model.eval()
    quantized = Lora(quantize=kind).prepare(b.model, b).model.eval()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        f = plain.base_model.model.forward_features(x)
        q = quantized.base_model.model.forward_features(x)
    cos = nn.functional.cosine_similarity(f.flatten(1), q.flatten(1)).min()
    assert cos > (0.97 if kind == "nf4" else 0.995), cos
    assert not torch.equal(f, q)  # the base really is quantized


def test_nf4_deployable_is_the_dequantized_merge_of_what_trained():
    b = _vit()
    adapted = Lora(quantize="nf4").prepare(b.model, b)
    with torch.no_grad():
        for n, p in adapted.model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        trained = adapted.model.eval()(x)
        deployable = copy.deepcopy(adapted).to_deployable().eval()
        assert not any("bitsandbytes" in type(m).__module__ for m in deployable.modules())
        assert torch.allclose(deployable(x), trained, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_qlora_trains_adapters_only_and_exports(kind, tiny_cfg, tmp_path):
    from visionft.export import export

    cfg = tiny_cfg("backbone.name=test_vit", "data.image_size=32", "strategy=lora", f"strategy.quantize={kind}",
                   "trainer.max_epochs=2", output_dir=tmp_path / "run")
    metrics = train(cfg)
    ckpt = torch.load(metrics["best_checkpoint"], weights_only=True, map_location="cpu")["state_dict"]
    base_key = next(k for k in ckpt if k.endswith("blocks.0.mlp.fc1.weight"))
    assert ckpt[base_key].dtype == (torch.uint8 if kind == "nf4" else torch.int8)  # the base stayed quantized
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in ckpt.items())  # zero-init B matrices trained
    artifact, report = export(metrics["best_checkpoint"], "onnx", tmp_path / "onnx")
    assert artifact.is_file() and report["batch_40"]["top1_agreement"] == 1.0


def test_ema_copies_packed_integer_weights_and_averages_floats():
    """EMA over a model holding uint8 packed weights: Lightning's own update truncated them (0.999 decay happened to
    be exact; 0.9 is not). The float parameter follows the EMA formula by hand."""
    from torch.optim.swa_utils import AveragedModel

    from visionft.callbacks import EMA

    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor([3.0, -1.0]))
            self.q = nn.Parameter(torch.tensor([3, 7, 200], dtype=torch.uint8), requires_grad=False)

    model = Packed()
    averaged = AveragedModel(model, **EMA(decay=0.9)._kwargs)
    averaged.update_parameters(model)
    expected = model.w.detach().clone()
    for step in range(5):
        with torch.no_grad():
            model.w.add_(1.0)
        averaged.update_parameters(model)
        expected = 0.9 * expected + 0.1 * model.w.detach()
    assert torch.equal(averaged.module.q, model.q)  # frozen packed weights unchanged
    assert torch.allclose(averaged.module.w, expected)
    assert not torch.equal(averaged.module.w, model.w)  # the float parameter really is averaged


def test_int8_is_quiet_and_refuses_a_device_its_scales_are_not_on(caplog):
    import logging

    b = _vit()
    model = Lora(quantize="int8").prepare(b.model, b).model
    with caplog.at_level(logging.WARNING), torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert not [r for r in caplog.records if "inputs will be cast" in r.getMessage()]  # was one per layer per call
    layer = model.base_model.model.blocks[0].mlp.fc1
    with pytest.raises(UsageError, match="strategy.quantize=int8 runs on the CPU only"):
        layer(torch.empty(2, layer.in_features, device="meta"))  # any device but the one it was quantized on


def test_quantize_errors_are_one_line():
    with pytest.raises(UsageError, match="valid: nf4, int8"):
        Lora(quantize="fp8")
    b = create_backbone("test_resnet", 10, pretrained=False, image_size=32)
    with pytest.raises(UsageError, match="has none outside its head: use a ViT-family backbone"):
        Lora(quantize="nf4").prepare(b.model, b)
