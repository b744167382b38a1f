"""Scaling out on existing engines: two "nodes" under torchrun (Lightning's DDP over gloo, on localhost), Hydra's
submitit launcher (its local executor) and Hydra's Optuna sweeper, each driven through the CLI as a user would."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY

pytestmark = pytest.mark.slow
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parent)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_under_torchrun_end_with_identical_weights_across_an_unfreeze(tmp_path):
    """2 nodes x 1 process (torchrun, gloo): gradual unfreezing opens a second group in epoch 1; both processes
    end with the same weights, the group opened mid-run changed, a group never opened did not."""
    port, dump = _free_port(), tmp_path / "weights"
    run = [o for o in TINY if not o.startswith(("trainer.max_epochs", "trainer.devices"))] + [
        "strategy=gradual_unfreeze", "trainer.max_epochs=2", "trainer.num_nodes=2", "trainer.devices=1",
        "trainer.strategy=ddp", f"paths.output_dir={tmp_path / 'run'}",
        "+callbacks.dump._target_=dist_helpers.SaveRankWeights", f"+callbacks.dump.dir={dump}"]
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                               f"--node_rank={r}", "--master_addr=127.0.0.1", f"--master_port={port}",
                               "-m", "visionft", *run], env=ENV, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    start = torch.load(dump / "start-rank0-of2.pt", weights_only=True)  # "of2": both ran in one world of 2
    end0, end1 = (torch.load(dump / f"end-rank{r}-of2.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(end0[k], end1[k]) for k in end0)  # identical across the two nodes
    changed = {k for k in end0 if end0[k].is_floating_point() and not torch.equal(end0[k], start[k])}
    assert any(k.startswith("fc.") for k in changed)  # the head trained from epoch 0
    assert any(k.startswith("layer") for k in changed)  # a body group opened mid-run (epoch 1) and trained
    assert not any(k.startswith(("conv1.", "bn1.")) for k in changed)  # the stem never opened in 2 epochs
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["test"]["test/acc"] > 0


def test_submitit_local_launcher_runs_a_sweep(tmp_path):
    """hydra/launcher=submitit_local: each job of a 2-point sweep runs through submitit and leaves a full run."""
    sweep = tmp_path / "sweep"
    done = subprocess.run([sys.executable, "-m", "visionft", "-m", "hydra/launcher=submitit_local", *TINY,
                           "seed=1,2", f"hydra.sweep.dir={sweep}", "hydra.launcher.timeout_min=10"],
                          env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = sorted(p.parent for p in sweep.glob("*/metrics.json"))
    assert [p.name for p in runs] == ["0", "1"]
    seeds = [yaml.safe_load((r / "config.yaml").read_text())["seed"] for r in runs]
    assert seeds == [1, 2]
    assert list((sweep / ".submitit").glob("*/*_log.out"))  # the jobs went through submitit


def test_optuna_sweeper_searches_lr_layer_decay_and_freeze_depth(tmp_path):
    """hparams_search=optuna on tiny data: 3 trials with sampled values inside the search space, and the study's
    best value is the best validation accuracy the trial runs wrote."""
    sweep = tmp_path / "sweep"
    done = subprocess.run([sys.executable, "-m", "visionft", "hparams_search=optuna_freeze", *TINY, "strategy=partial",
                           "hydra.sweeper.n_trials=3",
                           f"hydra.sweep.dir={sweep}"], env=ENV, cwd=tmp_path, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = sorted(p.parent for p in sweep.glob("*/metrics.json"))
    assert len(runs) == 3
    cfgs = [yaml.safe_load((r / "config.yaml").read_text())["strategy"] for r in runs]
    assert all(1e-5 <= c["lr"] <= 1e-2 and 0.5 <= c["layer_decay"] <= 1.0 and c["freeze_depth"] in (0, 1, 2, 3)
               for c in cfgs)
    assert len({c["lr"] for c in cfgs}) == 3  # sampled, not one value
    vals = [json.loads((r / "metrics.json").read_text())["val"]["val/acc"] for r in runs]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(vals))
