"""Options a run is given are honoured, or the run says what it did instead: class weights in the probe, kNN k
above the bank, the learning-rate log on small data, data.num_workers on a small machine, bf16 on a CPU without
it, the full-state save on SIGTERM, the param-group table at unfreeze."""
from __future__ import annotations

import pytest
import torch

from visionft.probe import run_probe, solve
from visionft.train import build


def test_configured_class_weights_reach_the_probe_head(tiny_cfg, tmp_path):
    """loss.class_weights with the default L-BFGS probe: the head run_probe writes is the weighted solve on the run's
    own features (tests/test_probe.py: that solve is scikit-learn's class-weighted fit), not the unweighted one."""
    weights = [8.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.25]
    cfg = tiny_cfg("strategy=linear_probe", "strategy.l2_grid=0.1", f"loss.class_weights={weights}",
                   f"paths.cache_dir={tmp_path / 'cache'}")
    dm, _, module = build(cfg)
    dm.setup()
    run = run_probe(module, dm, module.strategy.head_probe(), cfg.paths.cache_dir)
    head = module.adapted.model.get_classifier()
    train, val = ((run.features[s].x, run.features[s].y) for s in ("train", "val"))
    weighted = solve(train, val, 10, grid=[0.1], class_weights=weights)
    plain = solve(train, val, 10, grid=[0.1])
    torch.testing.assert_close(head.weight.detach(), weighted.weight)
    torch.testing.assert_close(head.bias.detach(), weighted.bias)
    assert (weighted.bias - plain.bias).abs().max() > 0.1


def test_knn_skips_k_above_the_bank_and_says_so(caplog):
    """k=200 on a bank of 196 training images would vote with the whole bank: the k is skipped (no metric), and the
    log names it and the bank size."""
    import logging

    from visionft.features import Features
    from visionft.probe import knn_accuracies

    g = torch.Generator().manual_seed(0)
    bank = Features(torch.randn(196, 8, generator=g), torch.arange(196) % 4)
    val = Features(torch.randn(30, 8, generator=g), torch.arange(30) % 4)
    with caplog.at_level(logging.INFO, logger="visionft.probe"):
        out = knn_accuracies(bank, {"train": bank, "val": val}, 4, ks=(10, 20, 100, 196, 200, 500))
    assert set(out) == {"k=10", "k=20", "k=100", "k=196"} and set(out["k=196"]) == {"val"}
    assert "kNN k=200,500 skipped: the bank holds 196 training images" in caplog.text


def test_learning_rate_is_logged_in_every_epoch_of_a_small_run(tiny_cfg, tmp_path):
    """80 synthetic images less 10% val: 72 training images, batch 16 (last partial batch dropped): 4 batches, 2
    optimizer steps per epoch with accumulate_grad_batches=2, fewer than log_every_n_steps=10. The CSV logger's
    metrics.csv still holds a learning rate in each of the 3 epochs (the epoch of a step: step // 2)."""
    import csv

    from visionft.train import train

    out = tmp_path / "run"
    train(tiny_cfg("strategy=full", "trainer.max_epochs=3", "trainer.log_every_n_steps=10",
                   "trainer.accumulate_grad_batches=2", "data.train_size=80", output_dir=out))
    rows = list(csv.DictReader(open(out / "csv" / "metrics.csv")))
    lr_steps = {int(r["step"]) for r in rows if any(v for k, v in r.items() if k.startswith("lr-"))}
    assert {s // 2 for s in lr_steps} == {0, 1, 2}, sorted(lr_steps)


def test_sigterm_saves_the_full_state_without_lightnings_weights_only_notice(tiny_cfg, tmp_path):
    """SIGTERM mid-fit: last.ckpt holds the optimizer and loop state (what resume=true needs), is read back by
    torch.load(weights_only=True), and Lightning's "`weights_only` was not set, defaulting to `False`" is not logged."""
    import logging

    import lightning as L
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from visionft.train import build_trainer

    class Term(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if batch_idx == 1:
                raise SIGTERMException

    records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    lightning_log = logging.getLogger("lightning.pytorch")
    level, lightning_log.level = lightning_log.level, logging.DEBUG
    lightning_log.addHandler(handler)
    try:
        cfg = tiny_cfg(output_dir=tmp_path / "run")
        dm, _, module = build(cfg)
        trainer, _, _ = build_trainer(cfg, tmp_path / "run")
        trainer.callbacks.append(Term())
        with pytest.raises(SIGTERMException):
            trainer.fit(module, datamodule=dm)
    finally:
        lightning_log.removeHandler(handler)
        lightning_log.setLevel(level)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2 and ckpt["optimizer_states"] and ckpt["loops"]
    assert not [r for r in records if "weights_only" in r.getMessage()], [r.getMessage() for r in records]


@pytest.mark.parametrize("flags, warned", [({"architecture": "x86_64", "avx2": True}, True),
                                           ({"architecture": "x86_64", "avx2": True, "avx512_bf16": True}, False),
                                           ({"architecture": "aarch64", "neon": True, "bf16": True}, False)])
def test_bf16_on_a_cpu_without_bf16_instructions_is_one_warning(tiny_cfg, tmp_path, monkeypatch, caplog, flags,
                                                                  warned):
    """trainer.precision=bf16-mixed on the CPU: one line naming the fix when torch reports no bfloat16 instructions
    (an AVX2-only x86 CPU), none when it reports AVX512-BF16 (x86) or BF16 (ARM)."""
    import logging

    from visionft.build import build_trainer

    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: flags)
    with caplog.at_level(logging.WARNING, logger="visionft.build"):
        build_trainer(tiny_cfg("trainer.precision=bf16-mixed", output_dir=tmp_path / "run"), tmp_path / "run")
    lines = [r.getMessage() for r in caplog.records if "bf16" in r.getMessage()]
    assert len(lines) == warned and all("use trainer.precision=32-true" in line for line in lines)


def test_bf16_warning_on_this_cpu_follows_its_cpuinfo_flags(tiny_cfg, tmp_path, caplog):
    """On this machine: the warning appears exactly when /proc/cpuinfo lists no bfloat16 instruction set (the
    kernel's word, independent of torch's detection), and 32-true never warns."""
    import logging
    from pathlib import Path

    from visionft.build import build_trainer

    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo")
    flags = set(" ".join(line for line in cpuinfo.read_text().splitlines() if line.startswith(("flags", "Features")))
                .split())
    has_bf16 = bool(flags & {"avx512_bf16", "amx_bf16", "bf16", "svebf16"})
    with caplog.at_level(logging.WARNING, logger="visionft.build"):
        build_trainer(tiny_cfg("trainer.precision=bf16-mixed", output_dir=tmp_path / "a"), tmp_path / "a")
        build_trainer(tiny_cfg("trainer.precision=32-true", output_dir=tmp_path / "b"), tmp_path / "b")
    assert sum("runs emulated" in r.getMessage() for r in caplog.records) == (not has_bf16)


def test_default_num_workers_follows_the_machine(monkeypatch):
    """data.num_workers defaults to 4, or to what Lightning suggests for the machine when that is fewer (its own
    suggested_max_num_workers: CPUs this process may use // processes per machine - 1): on 2 cores, 1 worker, so
    neither PyTorch's "more workers than CPUs" nor Lightning's "few workers" warning applies. A set value stays."""
    import os

    from conftest import compose_cfg
    from lightning.fabric.utilities import suggested_max_num_workers

    for data, cpus, devices, expected in [("cifar10", 2, 1, 1), ("cifar10", 3, 1, 2), ("cifar10", 16, 1, 4),
                                          ("cifar10", 8, 4, 1), ("cifar10", 16, 2, 4), ("cifar100", 2, 1, 1),
                                          ("imagefolder", 2, 1, 1)]:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)))
        cfg = compose_cfg([f"data={data}", f"trainer.devices={devices}"])
        assert cfg.data.num_workers == min(4, suggested_max_num_workers(devices)) == expected, (data, cpus, devices)
    assert compose_cfg(["data=imagefolder", "data.num_workers=3"]).data.num_workers == 3


def test_param_group_table_is_printed_once_then_only_what_changed(tiny_cfg, tmp_path):
    """Gradual unfreezing over 3 epochs: the full table (every depth group) at epoch 0, then at each unfreeze only the
    rows of the groups whose parameters started to train, as observed through requires_grad during training."""
    import logging

    import lightning as L

    from visionft.train import build_trainer

    class Trains(L.Callback):  # the depth groups with a parameter that trains, per epoch
        def __init__(self):
            self.depths = {}

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.depths[trainer.current_epoch] = {module.gates.depths[n] for n, p in module.model.named_parameters()
                                                  if p.requires_grad}

    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    rank_zero.addHandler(handler)
    try:
        cfg = tiny_cfg("strategy=gradual_unfreeze", "trainer.max_epochs=3", "data.train_size=48",
                       output_dir=tmp_path / "run")
        dm, _, module = build(cfg)
        trainer, _, _ = build_trainer(cfg, tmp_path / "run")
        trains = Trains()
        trainer.callbacks.append(trains)
        trainer.fit(module, datamodule=dm)
    finally:
        rank_zero.removeHandler(handler)
    tables = {}
    for r in records:
        if r.getMessage().startswith("param groups at epoch"):
            lines = r.getMessage().splitlines()
            tables[int(lines[0].split()[4])] = {int(line.split()[1]) for line in lines[3:]}  # rows' depth column
    assert tables[0] == set(range(len(module.group_names)))
    assert trains.depths[0] < trains.depths[1] < trains.depths[2]
    assert tables[1] == trains.depths[1] - trains.depths[0] and tables[2] == trains.depths[2] - trains.depths[1]
