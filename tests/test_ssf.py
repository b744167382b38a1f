"""SSF: scale and shift after every linear/conv/norm of the frozen backbone. Counts by the paper's formula, folding
for deployment against the unfolded model, and an export whose own parity check passes."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from visionft.backbones import create_backbone
from visionft.strategies import Ssf
from visionft.train import train


def _expected_trainable(model: nn.Module, head: str) -> int:
    """2 x output channels per linear, conv and affine norm layer outside the head (norms fused with an
    activation excluded), plus the head."""
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
    return total + sum(p.numel() for p in model.get_classifier().parameters())


@pytest.mark.parametrize("name", ["test_resnet", "test_vit", "test_efficientnet"])
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


def test_ssf_trains_and_exports_with_parity(tiny_cfg, tmp_path):
    cfg = tiny_cfg("strategy=ssf", "trainer.max_epochs=1", "export=torchscript", output_dir=tmp_path / "run")
    metrics = train(cfg)  # export re-runs the checkpoint unfolded and folded and compares the logits
    assert metrics["strategy"] == "Ssf" and any(a.endswith("model.pt") for a in metrics["artifacts"])
