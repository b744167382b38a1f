"""SSF: scale and shift after every linear/conv/norm of the frozen backbone. Counts by the paper's formula, folding
for deployment against the unfolded model, and an export whose own parity check passes."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d, RmsNorm
from torch import nn

from visionft.backbones import create_backbone
from visionft.strategies import Ssf
from visionft.train import train


def _expected_trainable(model: nn.Module, head: str) -> int:
    """2 x output channels per linear, conv and affine norm layer outside the head (norms fused with an
    activation excluded; an RMS norm has no bias, so it gets a scale and no shift), plus the head."""
    total = 0
    for name, m in model.named_modules():
        if name == head or name.startswith(head + "."):
            continue
        if isinstance(m, nn.Linear):
            total += 2 * m.out_features
        elif isinstance(m, nn.Conv2d):
            total += 2 * m.out_channels
        elif isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)) and m.weight is not None:
            fused = not isinstance(getattr(m, "act", nn.Identity()), nn.Identity)
            total += 0 if fused else 2 * m.weight.shape[0]
        elif isinstance(m, RmsNorm) and m.weight is not None:
            total += m.weight.shape[0]
    return total + sum(p.numel() for p in model.get_classifier().parameters())


# test_convnext: timm LayerNorm2d (an nn.LayerNorm over the channels of NCHW maps); test_vit4: RmsNorm (no bias)
@pytest.mark.parametrize("name", ["test_resnet", "test_vit", "test_efficientnet", "test_convnext", "test_vit4"])
def test_trainable_count_and_folding_match_the_unfolded_model(name):
    torch.manual_seed(0)
    b = create_backbone(name, 10, pretrained=False, image_size=32)
    expected = _expected_trainable(b.model, b.classifier)
    adapted = Ssf().prepare(b.model, b)
    assert sum(p.numel() for p in adapted.model.parameters() if p.requires_grad) == expected
    with torch.no_grad():  # a trained-looking SSF: scales and shifts away from the identity
        for n, p in adapted.model.named_parameters():
            if "ssf_" in n:
                p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(3, 3, 32, 32)
    deployable = adapted.to_deployable().eval()
    with torch.no_grad():
        ref, got = adapted.model.eval()(x), deployable(x)
        plain = create_backbone(name, 10, pretrained=False, image_size=32).model.eval()
    assert torch.allclose(ref, got, atol=1e-4), (ref - got).abs().max()
    assert not any("ssf_" in n for n, _ in deployable.named_parameters())
    assert not any(m._forward_hooks for m in deployable.modules())  # zero inference overhead: plain layers
    assert {n for n, _ in deployable.named_parameters()} >= {n for n, _ in plain.named_parameters()}
    assert (adapted.model(x) - plain(x)).abs().max() > 1e-3  # the scales changed the model: the check can fail


def test_the_tiny_models_have_the_norms_under_test():
    def kinds(name):
        return {type(m) for m in create_backbone(name, 10, pretrained=False, image_size=32).model.modules()}

    assert LayerNorm2d in kinds("test_convnext") and RmsNorm in kinds("test_vit4")


def test_scale_and_shift_sit_on_the_channels_of_a_layernorm2d():
    """LayerNorm2d normalizes and applies its affine over dim 1 of NCHW maps: SSF's scale and shift go there too,
    by hand: layer_norm over the channels, then s[c] * y + t[c]. A 4 x 4 map with 4 channels lets a last-dim scale
    broadcast without an error."""
    model = nn.Sequential(LayerNorm2d(4))
    adapted = Ssf().prepare(model, SimpleNamespace(classifier="head", groups=[]))
    s, t = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([10.0, 20.0, 30.0, 40.0])
    with torch.no_grad():
        model[0].ssf_scale.copy_(s), model[0].ssf_shift.copy_(t)
        x = torch.randn(2, 4, 4, 4)
        normed = F.layer_norm(x.permute(0, 2, 3, 1), (4,), eps=model[0].eps).permute(0, 3, 1, 2)
        expected = normed * s.view(1, 4, 1, 1) + t.view(1, 4, 1, 1)
        assert torch.allclose(adapted.model(x), expected, atol=1e-5)
        assert torch.allclose(adapted.to_deployable()(x), expected, atol=1e-5)


def test_an_rms_norm_gets_a_scale_and_no_shift():
    """RmsNorm's forward applies no bias: a shift there could not be folded, so SSF gives it a scale only."""
    model = nn.Sequential(RmsNorm(4))
    adapted = Ssf().prepare(model, SimpleNamespace(classifier="head", groups=[]))
    assert {n for n, _ in adapted.model.named_parameters()} == {"0.weight", "0.ssf_scale"}
    with torch.no_grad():
        model[0].ssf_scale.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        x = torch.randn(3, 5, 4)
        expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + model[0].eps) * torch.tensor([1.0, 2.0, 3.0, 4.0])
        assert torch.allclose(adapted.model(x), expected, atol=1e-5)
        assert torch.allclose(adapted.to_deployable()(x), expected, atol=1e-5)


@pytest.mark.parametrize("name", ["test_resnet", "test_convnext", "test_vit4"])
def test_ssf_trains_and_exports_with_parity(name, tiny_cfg, tmp_path):
    cfg = tiny_cfg("strategy=ssf", f"backbone.name={name}", "data.image_size=32", "data.train_size=32",
                   "data.test_size=8", "trainer.max_epochs=1", "export=torchscript", output_dir=tmp_path / "run")
    metrics = train(cfg)  # export re-runs the checkpoint unfolded and folded and compares the logits
    assert metrics["strategy"] == "Ssf" and any(a.endswith("model.pt") for a in metrics["artifacts"])
