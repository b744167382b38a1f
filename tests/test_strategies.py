"""Table-driven: for every strategy on a tiny ResNet and a tiny ViT, what really happens in a Trainer run:
which tensors change in each epoch, the LR each optimizer group holds at given steps, and each BatchNorm's mode."""
from __future__ import annotations

import lightning as L
import pytest
import torch

from visionft.module import TransferModule
from visionft.schedules import warmup_cosine
from visionft.train import build, build_trainer

EPOCHS, BATCHES = 3, 3
RESNET = ["stem", "block1", "block2", "block3", "block4", "head"]  # timm test_resnet
VIT = ["stem", *[f"block{i}" for i in range(1, 7)], "head"]  # timm test_vit: 6 blocks (norm in the last)


def _open(n, table):
    """table: epoch -> number of groups open from the head down (or 'all')."""
    return {e: set(range(n)) if k == "all" else set(range(n - k, n)) for e, k in table.items()}


# strategy overrides -> (epoch -> groups open counted from the head, BN policy of open groups, layer decay)
TABLE = {
    "scratch": (["strategy=scratch"], {0: "all", 1: "all", 2: "all"}, "train", 1.0),
    "linear_probe": (["strategy=linear_probe", "strategy.solver=adamw"], {0: 1, 1: 1, 2: 1}, "frozen", 1.0),
    "lp_ft": (["strategy=lp_ft"], {0: "all", 1: "all", 2: "all"}, "frozen", 1.0),
    "lp_ft_partial": (["strategy=lp_ft", "strategy.freeze_depth=2", "strategy.layer_decay=0.5"], {0: -2, 1: -2, 2: -2},
                      "frozen", 0.5),
    "full": (["strategy=full"], {0: "all", 1: "all", 2: "all"}, "frozen", 1.0),
    "full_bn_train": (["strategy=full", "strategy.bn=train"], {0: "all", 1: "all", 2: "all"}, "train", 1.0),
    "partial": (["strategy=partial", "strategy.freeze_depth=2"], {0: -2, 1: -2, 2: -2}, "frozen", 1.0),
    "gradual_unfreeze": (["strategy=gradual_unfreeze"], {0: 1, 1: 2, 2: 3}, "frozen", 1.0),
    "gradual_milestones": (["strategy=gradual_unfreeze", "strategy.milestones=[2]"], {0: 1, 1: 1, 2: 2},
                           "frozen", 1.0),
    "layerwise_lr": (["strategy=layerwise_lr", "strategy.layer_decay=0.5"], {0: "all", 1: "all", 2: "all"},
                     "frozen", 0.5),
    "ulmfit": (["strategy=ulmfit", "strategy.layer_decay=0.5"], {0: 1, 1: 2, 2: 3}, "frozen", 0.5),
    "lora": (["strategy=lora", "strategy.r=2"], {0: "all", 1: "all", 2: "all"}, "frozen", 1.0),
    "dora": (["strategy=dora", "strategy.r=2", "strategy.bn=train"], {0: "all", 1: "all", 2: "all"}, "train", 1.0),
    "bitfit": (["strategy=bitfit"], {0: "all", 1: "all", 2: "all"}, "frozen", 1.0),
    "ssf": (["strategy=ssf"], {0: "all", 1: "all", 2: "all"}, "frozen", 1.0),
    "adapter": (["strategy=adapter", "strategy.dim=4"], {0: "all", 1: "all", 2: "all"}, "frozen", 1.0),
    "adapter_seq": (["strategy=adapter", "strategy.dim=4", "strategy.placement=sequential", "strategy.layer_decay=0.5"],
                    {0: "all", 1: "all", 2: "all"}, "frozen", 0.5),
    "peft_loha": (["strategy=peft", "strategy.method=loha", "+strategy.options={r: 2}"], {0: "all", 1: "all", 2: "all"},
                  "frozen", 1.0),
    "lora_nf4": (["strategy=lora", "strategy.r=2", "strategy.quantize=nf4"], {0: "all", 1: "all", 2: "all"}, "frozen",
                 1.0),
    "bitfit_norm": (["strategy=bitfit", "strategy.norm=true"], {0: "all", 1: "all", 2: "all"}, "frozen", 1.0),
    "vpt": (["strategy=vpt", "strategy.tokens=2"], {0: "all", 1: "all", 2: "all"}, "frozen", 1.0),
    "vpt_deep": (["strategy=vpt", "strategy.tokens=2", "strategy.deep=true"], {0: "all", 1: "all", 2: "all"},
                 "frozen", 1.0),
}
ADAPTED = ("lora_A", "lora_B", "lora_magnitude_vector", "modules_to_save")  # what trains under peft
HEAD = ("fc.", "head.weight", "head.bias", "head.fc.")  # classifiers: test_resnet, test_vit(4), test_convnext


def _norm_weights(model):
    return {f"{n}.weight" for n, m in model.named_modules()
            if isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm))}


# strategies that train part of each open group: which tensors of an open group train (a rule from the method's
# definition, checked against what moved)
PARTIAL = {
    "lora": lambda n, m: any(a in n for a in ADAPTED),
    "dora": lambda n, m: any(a in n for a in ADAPTED),
    "lora_nf4": lambda n, m: any(a in n for a in ADAPTED),  # the packed 4-bit base never moves
    "ssf": lambda n, m: ".ssf_" in n or n.startswith(HEAD),  # scales/shifts and the head
    "adapter": lambda n, m: ".ft_adapter." in n or n.startswith(HEAD),  # bottleneck adapters and the head
    "adapter_seq": lambda n, m: ".ft_adapter." in n or n.startswith(HEAD),
    "peft_loha": lambda n, m: any(a in n for a in ("hada_w", "modules_to_save")),  # LoHa's Hadamard factors
    "bitfit": lambda n, m: n.endswith(".bias") or n.startswith(HEAD),
    "bitfit_norm": lambda n, m: n.endswith(".bias") or n.startswith(HEAD) or n in _norm_weights(m),
    "vpt": lambda n, m: n.startswith("prompts.") or n.startswith(tuple("vit." + h for h in HEAD)),
    "vpt_deep": lambda n, m: n.startswith("prompts.") or n.startswith(tuple("vit." + h for h in HEAD)),
}
ONLY = {"vpt": "vit", "vpt_deep": "vit", "lora_nf4": "vit"}  # ViT-family strategies (bitsandbytes: linear layers)
# zero_init_last=False: timm zero-initializes each residual block's last BN gamma, which at random init would stop
# every gradient inside the block (adapters there could never be seen to train)
MODELS = {"resnet": ("test_resnet", RESNET, ["+backbone.kwargs.zero_init_last=false"]),
          "vit": ("test_vit", VIT, ["data.image_size=32"])}
# further backbones for the strategies whose layers they exercise: timm's LayerNorm2d (an nn.LayerNorm over NCHW
# channels) in test_convnext, RmsNorm (no bias) in test_vit4
VIT9 = ["stem", *[f"block{i}" for i in range(1, 10)], "head"]  # timm test_vit4: 9 blocks
MORE_MODELS = {"convnext": ("test_convnext", RESNET, ["data.image_size=32"]),
               "vit_rmsnorm": ("test_vit4", VIT9, ["data.image_size=32"])}
MORE_CASES = {"convnext": ["ssf"], "vit_rmsnorm": ["ssf"]}
PAIRS = [(case, model) for case in TABLE for model in MODELS if ONLY.get(case, model) == model] + \
        [(case, model) for model, cases in MORE_CASES.items() for case in cases]


class Recorder(L.Callback):
    """Per epoch: parameters whose values changed, BN modes and running-stat changes, group LRs per step."""

    def __init__(self):
        self.changed, self.bn_mode, self.bn_stats_changed, self.lrs, self.rows = {}, {}, {}, {}, {}

    def on_train_epoch_start(self, trainer, module):
        self._before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
        self._bn_before = {n: m.running_mean.clone() for n, m in _bns(module)}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        opt = trainer.optimizers[0]
        self.lrs[trainer.global_step] = [(g["depth"], g["lr"], g["lr_mult"]) for g in opt.param_groups]

    def on_before_backward(self, trainer, module, loss):  # the modes the forward pass ran with
        e = trainer.current_epoch
        if e not in self.bn_mode:
            self.bn_mode[e] = {n: m.training for n, m in _bns(module)}
            self.rows[e] = module.param_group_rows()

    def on_train_epoch_end(self, trainer, module):
        e = trainer.current_epoch
        self.changed[e] = {n for n, p in module.model.named_parameters() if not torch.equal(p, self._before[n])}
        self.bn_stats_changed[e] = {n for n, m in _bns(module) if not torch.equal(m.running_mean, self._bn_before[n])}


def _wrapped(module, name):
    """The name a plain-model module has inside the (possibly wrapped) model."""
    return next(n for n, _ in module.model.named_modules() if module.adapted.plain_name(n) == name)


def _bns(module):
    return [(n, m) for n, m in module.model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def _run(tiny_cfg, overrides):
    cfg = tiny_cfg(f"trainer.max_epochs={EPOCHS}", f"trainer.limit_train_batches={BATCHES}",
                   "trainer.limit_val_batches=1", "scheduler.warmup_epochs=1", *overrides)
    L.seed_everything(cfg.seed, verbose=False)  # as train() does: the result must not depend on the tests before
    dm, backbone, module = build(cfg)
    trainer, _, _ = build_trainer(cfg, __import__("pathlib").Path(cfg.paths.output_dir))
    rec = Recorder()
    trainer.callbacks.append(rec)
    trainer.fit(module, datamodule=dm)
    return cfg, backbone, module, rec


@pytest.mark.parametrize("case, model", PAIRS, ids=[f"{c}-{m}" for c, m in PAIRS])
def test_strategy_table(case, model, tiny_cfg):
    """(ViT-only strategies are not run on convnets: their error is tested in test_bitfit_vpt.py, test_quantize.py)"""
    overrides, table, bn_policy, decay = TABLE[case]
    timm_name, group_names, extra = {**MODELS, **MORE_MODELS}[model]
    cfg, backbone, module, rec = _run(tiny_cfg, [f"backbone.name={timm_name}", *extra, *overrides])
    n = len(group_names)
    assert [g.name for g in backbone.groups] == group_names
    opened = _open(n, {e: (n + k if isinstance(k, int) and k < 0 else k) for e, k in table.items()})
    for epoch in range(EPOCHS):
        # 1. exactly the tensors of the open groups received updates in this epoch
        part = PARTIAL.get(case, lambda n, m: True)
        plain = module.adapted.backbone.model
        expected = {n for n, _ in module.model.named_parameters() if module.gates.depths[n] in opened[epoch]
                    and part(n, plain)}
        assert rec.changed[epoch] == expected, f"epoch {epoch}"
        if case in ("lora", "dora", "lora_nf4"):
            assert any("lora_B" in n for n in expected) and any("modules_to_save" in n for n in expected)
        if case.startswith("vpt"):
            assert sum(n.startswith("prompts.") for n in expected) == (6 if case == "vpt_deep" else 1)
        # 2. BatchNorm: trains only in open groups under policy 'train'; running stats move only then
        for bn_name, depth in backbone.bn_groups.items():
            bn_name = _wrapped(module, bn_name)
            should_train = bn_policy == "train" and depth in opened[epoch]
            assert rec.bn_mode[epoch][bn_name] is should_train, (epoch, bn_name)
            assert (bn_name in rec.bn_stats_changed[epoch]) is should_train, (epoch, bn_name)
    # 3. the LR each group really holds = lr * warmup_cosine(step) * decay^(distance from head) * open
    total, spe = EPOCHS * BATCHES, BATCHES
    for step, groups in rec.lrs.items():
        base = cfg.strategy.lr * warmup_cosine(step, total, spe, cfg.scheduler.min_lr_ratio)
        for depth, lr, mult in groups:
            assert mult == pytest.approx(decay ** (n - 1 - depth))  # (LoRA+ ratio is 1.0 here)
            is_open = depth in opened[step // spe]
            assert lr == pytest.approx(base * mult * is_open, rel=1e-6, abs=1e-12), (step, depth)
    # 4. what the logged param-group table reports agrees, epoch by epoch
    for epoch, rows in rec.rows.items():
        with_tensors = {module.gates.depths[n] for n in rec.changed[epoch]}  # LoRA leaves e.g. a ViT stem untouched
        assert {r["depth"] for r in rows if r["trainable"]} == opened[epoch] & with_tensors
        bn_rows = {r["depth"]: r["bn"] for r in rows if r["bn"] != "-"}
        assert bn_rows == {d: "train" if bn_policy == "train" and d in opened[epoch] else "eval"
                           for d in set(backbone.bn_groups.values())}


def test_lr_sampled_in_warmup_and_mid_cosine(tiny_cfg):
    """Layer-wise LR under the scheduler: read the optimizer during warmup and mid-cosine."""
    cfg, backbone, module, rec = _run(tiny_cfg, ["strategy=layerwise_lr", "strategy.layer_decay=0.5",
                                                 "scheduler.min_lr_ratio=0.0"])
    lr = cfg.strategy.lr
    head = [g for g in rec.lrs[1] if g[0] == 5][0][1]
    stem = [g for g in rec.lrs[1] if g[0] == 0][0][1]
    assert head == pytest.approx(lr * 2 / 3)  # warmup step 1 of 3: (1 + 1) / 3
    assert stem == pytest.approx(lr * 2 / 3 * 0.5 ** 5)
    mid = 3 + 3  # (total 9 - warmup 3) / 2 after warmup: cosine at half way = 0.5
    assert [g for g in rec.lrs[mid] if g[0] == 5][0][1] == pytest.approx(lr * 0.5)


def test_linear_probe_keeps_backbone_bn_frozen_for_the_whole_fit(tiny_cfg):
    cfg, backbone, module, rec = _run(tiny_cfg, ["strategy=linear_probe", "strategy.solver=adamw"])
    assert all(not any(modes.values()) for modes in rec.bn_mode.values())
    assert all(not changed for changed in rec.bn_stats_changed.values())
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"} == module.gates.trainable
    assert module.param_counts()["trainable_params"] == sum(p.numel() for p in module.model.fc.parameters())


def test_partial_out_of_range_names_the_valid_range(tiny_cfg):
    cfg = tiny_cfg("strategy=partial", "strategy.freeze_depth=9")
    with pytest.raises(ValueError, match=r"0\.\.5"):
        build(cfg)


def test_module_never_branches_on_strategy_name():
    import inspect

    import visionft.module as m

    src = inspect.getsource(m)
    assert "isinstance(self.strategy" not in src and "strategy ==" not in src and "LinearProbe" not in src
    assert issubclass(TransferModule, L.LightningModule)


def test_bad_strategy_options_are_clear_errors(tiny_cfg):
    from hydra.errors import InstantiationException

    with pytest.raises(InstantiationException, match="valid: frozen, train"):
        build(tiny_cfg("strategy.bn=foo"))
    with pytest.raises(ValueError, match=r"max_depth must be in 1\.\.6"):
        build(tiny_cfg("strategy=gradual_unfreeze", "strategy.max_depth=9"))


def test_a_phase_restarts_warmup_and_schedule_on_the_same_clock(tiny_cfg):
    """gradual_unfreeze with rewarm=true: each unfreeze (epochs 0, 1, 2) starts a phase of 3 steps; every group's LR
    is lr x warmup_cosine(step within the phase, phase length) x open(epoch), read from the optimizer."""
    cfg, backbone, module, rec = _run(tiny_cfg, ["strategy=gradual_unfreeze", "strategy.rewarm=true",
                                                 "scheduler.warmup_epochs=0.34"])  # 1 warmup step, 2 of cosine
    n = len(RESNET)
    lr, floor = cfg.strategy.lr, cfg.scheduler.min_lr_ratio
    warmup = round(cfg.scheduler.warmup_epochs * BATCHES)
    for step, groups in rec.lrs.items():
        epoch, local = divmod(step, BATCHES)
        for depth, got, _ in groups:
            opened = depth >= n - 1 - epoch
            expected = lr * warmup_cosine(local, BATCHES, warmup, floor) * opened
            assert got == pytest.approx(expected, abs=1e-12), (step, depth)
    heads = [next(g[1] for g in rec.lrs[s] if g[0] == n - 1) for s in sorted(rec.lrs)]
    assert heads[0] == heads[3] == heads[6] > heads[2]  # each phase restarts at the top of its schedule


def test_clock_phases_end_where_the_run_ends():
    """Phases at epochs 0, 1, 2 of 3 steps; max_steps=7 cuts the last phase to one step, and later starts vanish."""
    from visionft.optim import Clock

    clock = Clock(steps_per_epoch=3, total_steps=7, phase_starts=(0, 1, 2, 5))
    assert [clock.phase(t) for t in range(7)] == [(0, 3), (1, 3), (2, 3), (0, 3), (1, 3), (2, 3), (0, 1)]
    assert [clock.epoch(t) for t in (0, 2, 3, 6)] == [0, 0, 1, 2]


def test_no_core_module_knows_a_wrapper_by_name():
    """The adapter contract keeps peft (and any wrapper's naming) inside its strategy file."""
    from pathlib import Path

    import visionft

    core = ["module.py", "optim.py", "gates.py", "export.py", "train.py", "build.py", "backbones.py", "predict.py",
            "adapted.py", "api.py", "wise.py", "probe.py", "features.py", "embed.py"]
    root = Path(visionft.__file__).parent
    for name in core:
        src = (root / name).read_text()
        for word in ("peft", "lora", "merge_and_unload", "modules_to_save", "original_module", "base_model"):
            assert word not in src.lower(), (name, word)
