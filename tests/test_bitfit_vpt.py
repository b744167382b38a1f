"""BitFit and visual prompt tuning: what trains (by the methods' definitions), where prompts go, and export."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from visionft.backbones import create_backbone
from visionft.strategies import Vpt
from visionft.train import build, train


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("name", ["test_resnet", "test_vit", "test_efficientnet"])
def test_bitfit_trains_biases_and_the_head(name, norm, tiny_cfg):
    cfg = tiny_cfg(f"backbone.name={name}", "data.image_size=32", "strategy=bitfit", f"strategy.norm={norm}")
    _, _, module = build(cfg)
    plain = create_backbone(name, 10, pretrained=False, image_size=32).model
    norms = [m for m in plain.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm))]
    expected = (sum(m.bias.numel() for m in plain.modules() if getattr(m, "bias", None) is not None
                    and isinstance(m.bias, nn.Parameter))
                + plain.get_classifier().weight.numel()
                + (sum(m.weight.numel() for m in norms if m.weight is not None) if norm else 0))
    assert module.param_counts()["trainable_params"] == expected
    assert module.param_counts()["total_params"] == sum(p.numel() for p in plain.parameters())


@pytest.mark.parametrize("deep", [False, True])
@pytest.mark.parametrize("name,prefix", [("test_vit", 1), ("vit_small_patch14_reg4_dinov2", 5)])
def test_prompts_sit_after_the_class_and_register_tokens(name, prefix, deep):
    torch.manual_seed(0)
    b = create_backbone(name, 3, pretrained=False, image_size=28 if "patch14" in name else 32)
    size = b.data_config["input_size"][-1]
    x = torch.randn(2, 3, size, size)
    seen = {}
    blocks = b.model.blocks
    with torch.no_grad():
        plain_in = {}
        h = blocks[0].register_forward_pre_hook(lambda m, a: plain_in.setdefault(0, a[0].clone()))
        b.model.eval()(x)
        h.remove()
        adapted = Vpt(tokens=4, deep=deep).prepare(b.model, b)
        hooks = [blk.register_forward_pre_hook(lambda m, a, i=i: seen.setdefault(i, a[0].clone()))
                 for i, blk in enumerate(blocks)]
        adapted.model.eval()(x)
        [h.remove() for h in hooks]
    prompts = adapted.model.prompts
    patches = plain_in[0].shape[1] - prefix
    for i, inp in seen.items():
        assert inp.shape[1] == prefix + 4 + patches  # prompts replace, never accumulate
        if i == 0 or deep:
            assert torch.equal(inp[:, prefix:prefix + 4], prompts[i if deep else 0].expand(2, -1, -1)), i
    assert torch.equal(seen[0][:, :prefix], plain_in[0][:, :prefix])  # class/register tokens first, unchanged
    assert torch.equal(seen[0][:, prefix + 4:], plain_in[0][:, prefix:])  # then the patches
    # trainable: tokens x dim per prompted block, and the head; the backbone is frozen
    trainable = {n for n, p in adapted.model.named_parameters() if adapted.trainable(n)}
    dim, n_blocks = b.model.embed_dim, len(blocks)
    count = sum(p.numel() for n, p in adapted.model.named_parameters() if n in trainable)
    head = sum(p.numel() for p in b.model.get_classifier().parameters())
    assert count == 4 * dim * (n_blocks if deep else 1) + head
    assert all(n.startswith(("prompts.", "vit.head.")) for n in trainable)


def test_vpt_on_a_convnet_is_a_clear_error(tiny_cfg):
    with pytest.raises(ValueError, match="strategy=vpt needs a ViT-family backbone.*not ResNet"):
        build(tiny_cfg("strategy=vpt"))
    b = create_backbone("vit_small_patch16_rope_224", 3, pretrained=False, image_size=32)  # Eva: positions differ
    with pytest.raises(ValueError, match="not Eva"):
        Vpt().prepare(b.model, b)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx", "exported_program"])
def test_vpt_exports_with_the_prompts_inside(fmt, tiny_cfg, tmp_path):
    from visionft.export import export, load_trained
    from visionft.predict import load_runner

    out = tmp_path / "run"
    metrics = train(tiny_cfg("backbone.name=test_vit", "data.image_size=32", "strategy=vpt", "strategy.deep=true",
                             "strategy.tokens=3", "data.num_classes=4", "trainer.max_epochs=1", output_dir=out))
    artifact, report = export(metrics["best_checkpoint"], fmt, tmp_path / fmt)
    assert report["batch_40"]["max_abs_diff"] <= report["batch_40"]["tolerance"]
    model, _, _ = load_trained(metrics["best_checkpoint"])
    assert len(model.prompts) == 6
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        without = model.vit(x)  # the same weights without prompts: the prompts matter
    assert torch.allclose(load_runner(artifact)(x), ref, atol=1e-4)
    assert (ref - without).abs().max() > 1e-3
    assert Path(artifact.parent / "config.json").is_file()
    from safetensors.torch import load_file

    saved = load_file(str(out / "prompts.safetensors"))  # the task's small artifact: prompts + head only
    assert sorted(saved) == sorted([f"prompts.{i}" for i in range(6)] + ["vit.head.weight", "vit.head.bias"])
    assert torch.equal(saved["prompts.3"], model.prompts[3].detach())
