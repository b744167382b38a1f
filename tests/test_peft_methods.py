"""strategy=peft: any peft tuner by name. Trainable counts against peft's own, adapter parameters in the depth group
of the layer they adapt (read off peft's tuner layers), merge for export and reload onto a fresh backbone against
the trained model, and one-line errors for what peft refuses."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import TINY
from peft.tuners.tuners_utils import BaseTunerLayer
from test_lora import _base_weights

from visionft.backbones import create_backbone
from visionft.strategies.lora import load_adapter
from visionft.train import build, train


@pytest.mark.parametrize("method,options", [("loha", "{r: 4}"), ("lokr", "{r: 4}"), ("boft", "{boft_block_size: 4}")])
@pytest.mark.parametrize("name", ["test_resnet", "test_vit"])
def test_trainable_parameters_are_peft_own_and_sit_in_their_layers_group(method, options, name, tiny_cfg):
    cfg = tiny_cfg(f"backbone.name={name}", "data.image_size=32", "strategy=peft", f"strategy.method={method}",
                   f"+strategy.options={options}")
    _, _, module = build(cfg)
    peft_trainable, _ = module.model.get_nb_trainable_parameters()
    assert module.param_counts()["trainable_params"] == peft_trainable > 0
    depths, adapters = module.gates.depths, 0
    for layer_name, layer in module.model.named_modules():
        if isinstance(layer, BaseTunerLayer) and hasattr(layer, "base_layer"):
            for pname, p in layer.named_parameters(prefix=layer_name):
                if p.requires_grad and ".base_layer." not in pname:
                    adapters += 1
                    assert depths[pname] == depths[f"{layer_name}.base_layer.weight"], pname
    assert adapters > 0


@pytest.mark.parametrize("method,options,wise", [("loha", "{r: 4}", []), ("lokr", "{r: 4}", []),
                                                 ("oft", "{oft_block_size: 4}", ["wise.alphas=[0.5]"])])
def test_adapter_merges_for_export_and_reloads_onto_a_fresh_backbone(method, options, wise, tiny_cfg, tmp_path):
    """(With WiSE-FT at alpha 0.5, the final model's base weights moved along the merged line: the checkpoint
    reloaded for the export's parity check and the adapter artifact both carry them.)"""
    out, base = tmp_path / "run", _base_weights(tmp_path, "test_resnet")  # the same base weights for both
    cfg = tiny_cfg(f"backbone.checkpoint={base}", "data.image_size=32", "strategy=peft", f"strategy.method={method}",
                   f"+strategy.options={options}", "strategy.lr=1e-2", "trainer.max_epochs=2", "export=torchscript",
                   *wise, output_dir=out)
    metrics = train(cfg)  # the export checks its own parity against the unmerged checkpoint
    assert metrics.get("wise", {}).get("alpha") == (0.5 if wise else None)
    assert any(a.endswith("model.pt") for a in metrics["artifacts"])
    _, _, module = build(cfg)
    state = torch.load(metrics["final_checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state)
    fresh = lambda: create_backbone("test_resnet", 10, pretrained=False, checkpoint=str(base), image_size=32).model  # noqa: E731
    reloaded = load_adapter(fresh(), out)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref, got, plain = module.model.eval()(x), reloaded.eval()(x), fresh().eval()(x)
    assert torch.allclose(ref, got, atol=1e-5), (ref - got).abs().max()
    assert (plain - ref).abs().max() > 1e-3  # training changed the outputs: the check above can fail


@pytest.mark.parametrize("overrides,says", [
    (["strategy.method=nonsense"], "not a peft method that adapts layers"),
    (["strategy.method=fourierft"], "torch.nn.Linear"),
    (["strategy.method=loha", "+strategy.options={bogus: 1}"], "are not options of peft's LoHaConfig"),
])
def test_what_peft_refuses_is_one_line_exit_2(overrides, says, tmp_path):
    r = subprocess.run([sys.executable, "-m", "visionft", *TINY, "strategy=peft", *overrides,
                        f"paths.output_dir={tmp_path / 'r'}"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and says in r.stderr, r.stderr[-1500:]


def _merged(model, state) -> dict:
    """The plain model's weights of a peft model in ``state``: peft's own merge."""
    import copy

    m = copy.deepcopy(model)
    m.load_state_dict(state)
    return {k: v.detach().clone() for k, v in m.merge_and_unload().state_dict().items()}


@pytest.mark.parametrize("method,options", [("loha", {"r": 4}), ("lokr", {"r": 4}), ("oft", {"oft_block_size": 8})])
def test_wise_follows_the_straight_line_of_the_merged_weights(method, options, tmp_path):
    """alpha = 0.5 between the start (identity adapters) and a trained-looking end: the merged weights are
    W0 + 0.5 * dW (peft's merge of each end), not a merge of half-way factors; the adapter artifact written
    afterwards reloads onto a fresh backbone as the interpolated model."""
    from visionft.strategies.lora import save_adapter
    from visionft.strategies.peft_methods import Peft
    from visionft.wise import interpolate, snapshot

    b = create_backbone("test_vit", 10, pretrained=False, image_size=32)
    pretrained = {k: v.clone() for k, v in b.model.state_dict().items()}
    adapted = Peft(method=method, options=options).prepare(b.model, b)
    start = snapshot(adapted.model)
    with torch.no_grad():
        for n, p in adapted.model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    end = snapshot(adapted.model)
    w0, w1 = _merged(adapted.model, start), _merged(adapted.model, end)
    adapted.model.load_state_dict(interpolate(adapted.wise_anchor(start, end), end, 0.5))
    adapted.wise_chosen(0.5)  # as wise_ft tells it: the kept alpha moved the base weights
    half = _merged(adapted.model, adapted.model.state_dict())
    moved = [k for k in w0 if w0[k].is_floating_point() and not torch.equal(w0[k], w1[k])]
    assert any(".attn." in k for k in moved)  # the adapters changed the adapted layers: the line can be missed
    for k in moved:
        assert torch.allclose(w0[k], pretrained[k], atol=1e-6)  # the start: the pretrained weights
        off_line = (half[k] - (w0[k] + 0.5 * (w1[k] - w0[k]))).abs().max().item()
        assert off_line < 1e-5, (k, off_line)
    fresh = create_backbone("test_vit", 10, pretrained=False, image_size=32).model
    fresh.load_state_dict(pretrained)
    save_adapter(adapted.model, tmp_path, adapted.artifact_state())
    reloaded = load_adapter(fresh, tmp_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(reloaded.eval()(x), adapted.model.eval()(x), atol=1e-5)
