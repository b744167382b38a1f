"""LoRA/DoRA through peft: parameter counts by formula, adapter save/reload, merging, target errors, LoRA+."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from visionft.backbones import create_backbone
from visionft.strategies import Lora
from visionft.strategies.lora import load_adapter
from visionft.train import build, build_trainer, train


def _expected_trainable(model: nn.Module, targets: list[str], r: int, dora: bool) -> int:
    """r(d_in + d_out) per linear layer, r(c_in k^2 + c_out) per k x k conv, + d_out for DoRA; + the head."""
    modules = dict(model.named_modules())
    total = 0
    for name in targets:
        m = modules[name]
        if isinstance(m, nn.Linear):
            total += r * (m.in_features + m.out_features) + (m.out_features if dora else 0)
        else:
            k = m.kernel_size[0] * m.kernel_size[1]
            total += r * (m.in_channels * k + m.out_channels) + (m.out_channels if dora else 0)
    return total + sum(p.numel() for p in model.get_classifier().parameters())


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("name", ["test_vit", "test_resnet", "test_efficientnet", "resnet18", "vit_small_patch16_224"])
def test_trainable_parameter_counts_match_the_formula(name, dora, tiny_cfg):
    cfg = tiny_cfg(f"backbone.name={name}", "data.image_size=32", "strategy=lora", "strategy.r=4",
                   f"strategy.use_dora={dora}")
    dm, backbone, module = build(cfg)
    plain = create_backbone(name, dm.num_classes, pretrained=False, image_size=32).model
    targets = module.strategy.targets(plain)
    counts = module.param_counts()
    assert counts["trainable_params"] == _expected_trainable(plain, targets, 4, dora)
    # total = the plain model + the adapters; peft's frozen copy of the head is not counted twice
    adapters = counts["trainable_params"] - sum(p.numel() for p in plain.get_classifier().parameters())
    assert counts["total_params"] == sum(p.numel() for p in plain.parameters()) + adapters


def _unzero_bn(model: nn.Module) -> None:
    """timm zero-initializes the last BatchNorm gamma of each residual block, which makes a random-init block (and
    any adapter inside it) a no-op; give every gamma a real value so the checks below can fail."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)


def _base_weights(tmp_path, name):
    torch.manual_seed(0)
    b = create_backbone(name, 10, pretrained=False, image_size=32)
    _unzero_bn(b.model)
    path = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in b.model.state_dict().items()}, str(path))
    return path


@pytest.mark.parametrize("name,bn", [("test_vit", "frozen"), ("test_resnet", "train")])
def test_adapter_reloads_onto_a_fresh_backbone(name, bn, tiny_cfg, tmp_path):
    base = _base_weights(tmp_path, name)
    out = tmp_path / "run"
    cfg = tiny_cfg(f"backbone.name={name}", f"backbone.checkpoint={base}", "data.image_size=32", "strategy=lora",
                   f"strategy.bn={bn}", "trainer.max_epochs=2", "strategy.lr=1e-2", output_dir=out)
    metrics = train(cfg)
    assert (out / "adapter.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert (out / "adapter.safetensors").stat().st_size < 0.5 * (out / "checkpoints" / "last.ckpt").stat().st_size
    # the trained model as the run ended (best checkpoint weights after testing)
    dm, backbone, module = build(cfg)
    state = torch.load(metrics["best_checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state)
    fresh = create_backbone(name, 10, pretrained=False, checkpoint=str(base), image_size=32).model
    reloaded = load_adapter(fresh, out)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref, got = module.model.eval()(x), reloaded.eval()(x)
    assert torch.allclose(ref, got, atol=1e-5), (ref - got).abs().max()
    plain = create_backbone(name, 10, pretrained=False, checkpoint=str(base), image_size=32).model.eval()
    with torch.no_grad():
        assert (plain(x) - ref).abs().max() > 1e-3  # training changed the outputs: the check above can fail
    if bn == "train":  # the statistics that BatchNorm learned travel with the adapter
        assert any(k.endswith("running_mean") for k in __import__("safetensors.torch").torch.load_file(
            str(out / "adapter.safetensors")))


@pytest.mark.parametrize("name", ["test_vit", "test_resnet", "test_efficientnet"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_merge_and_unload_matches_the_unmerged_model(name, dora):
    torch.manual_seed(0)
    b = create_backbone(name, 10, pretrained=False, image_size=32)
    _unzero_bn(b.model)
    adapted = Lora(r=4, use_dora=dora).prepare(b.model, b)
    model = adapted.model.eval()
    with torch.no_grad():  # B = 0 at init makes the check vacuous: give every B matrix real values
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        unmerged = model(x)
        with model.disable_adapter():
            without = model(x)
        merged_model = copy.deepcopy(adapted).to_deployable()  # peft's merge_and_unload
        merged = merged_model(x)
    assert not any("lora" in n for n, _ in merged_model.named_parameters())  # a plain timm model again
    tol = 1e-6 * unmerged.abs().max().item() + 1e-5
    assert (unmerged - without).abs().max().item() > 100 * tol  # the adapters really change the outputs
    assert (merged - unmerged).abs().max().item() <= tol


def test_grouped_conv_target_is_a_clear_error():
    b = create_backbone("test_efficientnet", 10, pretrained=False)
    with pytest.raises(ValueError, match="grouped/depthwise"):
        Lora(target_modules=r"blocks\.\d+\.\d+\.conv_dw").prepare(b.model, b)
    with pytest.raises(ValueError, match="matches no module"):
        Lora(target_modules=r"nothing\.here").prepare(b.model, b)


def test_resnet_default_targets_are_block_convs_only():
    b = create_backbone("resnet50d", 10, pretrained=False)  # deep stem: conv1 is an nn.Sequential
    targets = Lora().targets(b.model)
    assert targets and all(t.startswith("layer") and t.split(".")[-1] in ("conv1", "conv2", "conv3") for t in targets)


def test_loraplus_ratio_scales_the_b_matrices(tiny_cfg):
    cfg = tiny_cfg("backbone.name=test_vit", "data.image_size=32", "strategy=lora", "strategy.loraplus_ratio=16",
                   "trainer.limit_train_batches=2")
    dm, backbone, module = build(cfg)
    trainer, _, _ = build_trainer(cfg, __import__("pathlib").Path(cfg.paths.output_dir))
    trainer.fit(module, datamodule=dm)
    groups = trainer.optimizers[0].param_groups
    names = {id(p): n for n, p in module.model.named_parameters()}
    kinds = [{names[id(p)].split(".lora_")[-1][:1] if ".lora_" in names[id(p)] else "head" for p in g["params"]}
             for g in groups]
    b_groups = [g for g, k in zip(groups, kinds) if k == {"B"}]
    a_groups = [g for g, k in zip(groups, kinds) if k == {"A"}]
    assert b_groups and a_groups and len(b_groups) + len(a_groups) + 2 == len(groups)  # + head (decay, no decay)
    assert all(g["lr_mult"] == 16 for g in b_groups) and all(g["lr_mult"] == 1 for g in a_groups)
    assert b_groups[0]["lr"] == pytest.approx(16 * a_groups[0]["lr"])
