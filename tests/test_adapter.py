"""Bottleneck adapters: trainable counts by formula from the architecture, each placement's function against a hand
computation on an unadapted copy, the pretrained function at the start, depth groups, and a trained model that
exports in every format with its parity check."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from visionft.backbones import create_backbone
from visionft.errors import UsageError
from visionft.export import FORMATS, export
from visionft.strategies import Adapter
from visionft.train import train


def _block_channels(block: nn.Module) -> tuple[int, int]:
    """(input, output) channels of a timm ResNet block from its convolutions (downsample path aside)."""
    convs = [m for n, m in block.named_modules() if isinstance(m, nn.Conv2d) and "downsample" not in n]
    return convs[0].in_channels, convs[-1].out_channels


def _expected(model: nn.Module, name: str, placement: str, dim: int) -> int:
    """Adapter weights + biases per site (down: c_in x dim + dim, up: dim x c_out + c_out), plus the head."""
    if name == "test_vit":
        sites = [(model.embed_dim, model.embed_dim)] * len(model.blocks)
    else:
        sites = [_block_channels(b) for layer in (model.layer1, model.layer2, model.layer3, model.layer4)
                 for b in layer]
    if placement == "sequential":
        sites = [(out, out) for _, out in sites]
    head = sum(p.numel() for p in model.get_classifier().parameters())
    return sum(c_in * dim + dim + dim * c_out + c_out for c_in, c_out in sites) + head


@pytest.mark.parametrize("placement", ["parallel", "sequential"])
@pytest.mark.parametrize("name", ["test_resnet", "test_vit"])
def test_trainable_count_by_formula_and_the_pretrained_function_at_start(name, placement):
    torch.manual_seed(0)
    b = create_backbone(name, 10, pretrained=False, image_size=32)
    expected = _expected(b.model, name, placement, dim=8)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = b.model.eval()(x)
    adapted = Adapter(placement=placement, dim=8).prepare(b.model, b)
    assert sum(p.numel() for p in adapted.model.parameters() if p.requires_grad) == expected
    with torch.no_grad():
        assert torch.equal(adapted.model(x), before)  # up-projections start at zero
        for n, p in adapted.model.named_parameters():
            if ".up." in n:
                p.normal_(std=0.5)
        assert (adapted.model(x) - before).abs().max() > 1e-3  # the adapters are in the forward pass


def _bottleneck(a, x: torch.Tensor, conv: bool, stride: int = 1) -> torch.Tensor:
    if conv:
        h = F.relu(F.conv2d(x, a.down.weight, a.down.bias, stride=stride))
        return F.conv2d(h, a.up.weight, a.up.bias) * a.scale
    return F.linear(F.relu(F.linear(x, a.down.weight, a.down.bias)), a.up.weight, a.up.bias) * a.scale


@pytest.mark.parametrize("placement", ["parallel", "sequential"])
@pytest.mark.parametrize("name,site", [("test_vit", "blocks.1.mlp"), ("test_resnet", "layer2.0")])
def test_each_placement_computes_its_formula(name, site, placement):
    """parallel: f(x) + s*A(x) from the site's input (strided like a downsampling block);
    sequential: f(x) + s*A(f(x))."""
    torch.manual_seed(0)
    b = create_backbone(name, 10, pretrained=False, image_size=32, kwargs={"zero_init_last": False}
                        if name == "test_resnet" else None)
    plain = copy.deepcopy(b.model).eval()
    adapted = Adapter(placement=placement, dim=4, scale=0.5).prepare(b.model, b)
    module = adapted.model.eval().get_submodule(site)
    a = module.ft_adapter
    with torch.no_grad():
        a.up.weight.normal_()
        a.up.bias.normal_()
        x = (torch.randn(2, _block_channels(plain.get_submodule(site))[0], 8, 8) if name == "test_resnet"
             else torch.randn(2, 5, b.model.embed_dim))  # a feature map / 5 tokens
        base = plain.get_submodule(site)(x)
        stride = 2 if name == "test_resnet" and placement == "parallel" else 1  # layer2.0 halves the feature map
        expected = base + _bottleneck(a, x if placement == "parallel" else base, conv=x.dim() == 4, stride=stride)
        assert torch.allclose(module(x), expected, atol=1e-5)
        assert (expected - base).abs().max() > 1e-3


@pytest.mark.parametrize("size", [48, 40])
def test_parallel_adapters_follow_odd_sized_downsampling(size):
    """EfficientNet at 48 px halves a 3 px map to 2 px (and 5 to 3 at 40 px): the strided adapter must match."""
    b = create_backbone("efficientnet_lite0", 10, pretrained=False, image_size=size)
    adapted = Adapter(dim=4).prepare(b.model, b)
    assert adapted.model.eval()(torch.randn(2, 3, size, size)).shape == (2, 10)


def test_adapters_belong_to_the_depth_group_of_their_block():
    b = create_backbone("test_vit", 10, pretrained=False, image_size=32)
    adapted = Adapter(dim=4).prepare(b.model, b)
    for n, _ in adapted.model.named_parameters():
        if ".ft_adapter." in n:
            block = n.split(".ft_adapter.")[0].removesuffix(".mlp")
            assert adapted.depth_of(n) == adapted.depth_of(f"{block}.norm1.weight"), n
            assert adapted.plain_name(n) is None


@pytest.mark.slow
def test_adapter_trains_and_exports_in_every_format(tiny_cfg, tmp_path):
    cfg = tiny_cfg("backbone.name=test_vit", "data.image_size=32", "strategy=adapter", "strategy.dim=8",
                   "strategy.scale=0.5", "trainer.max_epochs=2", output_dir=tmp_path / "run")
    metrics = train(cfg)
    assert metrics["strategy"] == "Adapter" and any(a.endswith("adapters.safetensors") for a in metrics["artifacts"])
    from safetensors.torch import load_file

    saved = load_file(next(a for a in metrics["artifacts"] if a.endswith("adapters.safetensors")))
    assert any(".ft_adapter.up." in k for k in saved) and any(k.startswith("head.") for k in saved)
    assert any(v.abs().max() > 0 for k, v in saved.items() if ".up." in k)  # the zero-init up-projections trained
    for fmt in sorted(FORMATS):  # export re-runs the checkpoint and compares the artifact's logits
        artifact, report = export(metrics["best_checkpoint"], fmt, tmp_path / fmt)
        assert artifact.is_file() and report["batch_40"]["top1_agreement"] == 1.0
        # not a plain timm model any more: no model.safetensors that timm.create_model would reject
        assert (tmp_path / fmt / "config.json").is_file() and not (tmp_path / fmt / "model.safetensors").exists()


@pytest.mark.parametrize("size", [32, 64])
def test_channels_last_mlp_sites_get_linear_adapters_on_their_channels(size):
    """ConvNeXt's MLP works on (N, H, W, C): the adapter must act on C (96), whatever the image size."""
    b = create_backbone("convnext_atto", 10, pretrained=False, image_size=size, kwargs={"conv_mlp": False})
    adapted = Adapter(dim=4, sites=r"stages\.0\.blocks\.0\.mlp").prepare(b.model, b)
    a = adapted.model.get_submodule("stages.0.blocks.0.mlp").ft_adapter
    c = b.model.stages[0].blocks[0].mlp.fc1.in_features
    assert isinstance(a.down, nn.Linear) and (a.down.in_features, a.up.out_features) == (c, c)
    assert adapted.model(torch.randn(2, 3, size, size)).shape == (2, 10)


def test_artifact_keeps_batchnorm_statistics_when_batchnorm_trains():
    b = create_backbone("test_resnet", 10, pretrained=False, image_size=32)
    state = Adapter(dim=4, bn="train").prepare(b.model, b).artifact_state()
    assert any(k.endswith("running_mean") for k in state) and any(".ft_adapter." in k for k in state)
    b = create_backbone("test_resnet", 10, pretrained=False, image_size=32)
    assert not any(k.endswith("running_mean") for k in Adapter(dim=4).prepare(b.model, b).artifact_state())


def test_bad_options_and_sites_are_one_line_errors():
    with pytest.raises(UsageError, match="valid: parallel, sequential"):
        Adapter(placement="serial")
    b = create_backbone("test_vit", 10, pretrained=False, image_size=32)
    with pytest.raises(UsageError, match=r"strategy.sites=.* matches no module of VisionTransformer"):
        Adapter(sites=r"nothing\..*").prepare(b.model, b)
