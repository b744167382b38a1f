"""Preemption and failed writes lose nothing: SIGTERM/Ctrl+C save a resumable checkpoint and exit non-zero with the
command that resumes; a checkpoint write that fails (full disk) leaves the previous checkpoint loadable."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import TINY

SLOW_TINY = [o for o in TINY if not o.startswith("trainer.max_epochs")] + ["trainer.max_epochs=200"]


def _launch(tmp_path, *extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "visionft", *SLOW_TINY, *extra,
                             f"paths.output_dir={tmp_path / 'run'}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)


def _wait_for(path, proc, timeout=120):
    start = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - start < timeout
        time.sleep(0.2)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_a_resumable_checkpoint_and_exits_nonzero(tmp_path, sig, code):
    proc = _launch(tmp_path)
    _wait_for(tmp_path / "run" / "checkpoints" / "last.ckpt", proc)  # training is under way (epoch 1 done)
    time.sleep(0.5)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"stopped: {sig.name} received") and "resume=true" in line
    from visionft.resume import resume_command

    assert line.endswith(f"Resume with: python -m visionft resume=true paths.output_dir={tmp_path / 'run'}")
    assert line.endswith(resume_command(tmp_path / "run"))  # the same, quoted for a shell when the path needs it
    assert line in (tmp_path / "run" / "__main__.log").read_text()  # the run's log keeps it
    assert "Traceback" not in err
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    step = ckpt["global_step"]
    assert f"step {step};" in line and step > 0
    from conftest import compose_cfg

    from visionft.train import train

    # the command the line names resumes it (in-process: the CLI's part, the signal and the line, is tested above)
    resumed = train(compose_cfg([*TINY, f"trainer.max_epochs={ckpt['epoch'] + 2}", "resume=true"], tmp_path / "run"))
    assert resumed["epochs"] == ckpt["epoch"] + 2 and (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize("epoch", [1, 0])
def test_a_second_ctrl_c_stops_at_once_naming_the_checkpoint_that_resumes(tmp_path, epoch):
    """Ctrl+C twice inside one (slowed) training batch: no traceback, exit 130, and the last line names what is on
    disk: last.ckpt of epoch 0 with its epoch and step and the resume command, or (stopped in epoch 0) no checkpoint."""
    from pathlib import Path

    from visionft.resume import resume_command

    marker, run = tmp_path / "slow", tmp_path / "run"
    tests = str(Path(__file__).parent)
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen([sys.executable, "-m", "visionft", *SLOW_TINY, f"paths.output_dir={run}",
                             "+callbacks.slow._target_=signal_helpers.SlowBatches", f"+callbacks.slow.marker={marker}",
                             f"+callbacks.slow.epoch={epoch}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    _wait_for(marker, proc)  # a slow batch (of epoch 1: epoch 0's checkpoints are written) is under way
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)  # the first is handled (Python runs a handler once for signals that arrive together)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("stopped: SIGINT received twice: stopped at once at epoch ")
    last = run / "checkpoints" / "last.ckpt"
    if epoch:
        ckpt = torch.load(last, map_location="cpu", weights_only=True)
        assert ckpt["epoch"] == 0
        assert f"resumable checkpoint {last} (epoch 0, step {ckpt['global_step']})" in line
        assert line.endswith(f"Resume with: {resume_command(run)}")
    else:
        assert not last.exists() and line.endswith(f"no resumable checkpoint was saved ({last}): start the run again")
    assert line in (run / "__main__.log").read_text()


def test_a_failed_checkpoint_write_keeps_the_previous_one(tiny_cfg, tmp_path, monkeypatch, capsys):
    import visionft.checkpoints as ck
    from visionft.__main__ import main

    real_write = ck._write_bytes
    calls = {"n": 0}

    def fails_on_second_epoch(path, data):
        calls["n"] += 1
        if calls["n"] > 2:  # epoch 0 wrote best.ckpt and last.ckpt; epoch 1's writes hit a full disk midway
            with open(path, "wb") as f:
                f.write(bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, data)

    monkeypatch.setattr(ck, "_write_bytes", fails_on_second_epoch)
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["visionft", *TINY, "trainer.max_epochs=3", f"paths.output_dir={out}"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: no space left on the device writing") and "resume=true" in err[-1]
    assert err[-1].endswith(f"then resume with `python -m visionft resume=true paths.output_dir={out}`")
    for name in ("best.ckpt", "last.ckpt"):  # the epoch-0 files are intact and load
        ckpt = torch.load(out / "checkpoints" / name, map_location="cpu", weights_only=True)
        assert ckpt["epoch"] == 0 and ckpt["state_dict"]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.endswith(".tmp")]


class Poison(__import__("lightning").Callback):
    """Test helper: at epoch 1, batch 1, poison the head (NaN, or x1e6 for an exploding loss)."""

    def __init__(self, how: str = "poison") -> None:
        self.how, self.step = how, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.current_epoch == 1 and batch_idx == 1 and self.step is None:
            self.step = trainer.global_step
            with torch.no_grad():
                w = module.model.get_classifier().weight
                w.fill_(float("nan")) if self.how == "poison" else w.mul_(1e6).add_(1e3)


@pytest.mark.parametrize("how, why, extra, fold", [
    ("poison", "loss not finite from step 11", [], None), ("explode", "x the loss at the start", [], None),
    ("poison", "loss not finite from step 11", ["+trainer.val_check_interval=0.5"], None),  # checkpoints mid-epoch too
    ("poison", "loss not finite from step 11", [], 1), ("explode", "x the loss at the start", [], 2),  # folded early
])
def test_divergence_stops_naming_step_lr_precision_and_keeps_the_good_checkpoint(tiny_cfg, tmp_path, monkeypatch, how,
                                                                                 why, extra, fold):
    from visionft.callbacks import NanGuard, NonFiniteLoss
    from visionft.train import train

    if fold:
        monkeypatch.setattr(NanGuard, "FOLD", fold)

    cfg = tiny_cfg("trainer.max_epochs=4", f"+callbacks.poison._target_={__name__}.Poison",
                   f"+callbacks.poison.how={how}", *extra, output_dir=tmp_path / "run")
    with pytest.raises(NonFiniteLoss) as e:
        train(cfg)
    message = str(e.value)
    assert why in message and "in epoch 1" in message and "learning rates" in message and "32-true" in message
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    last = torch.load(path, map_location="cpu", weights_only=True)
    assert last["epoch"] == 0 and all(torch.isfinite(v).all() for v in last["state_dict"].values()
                                      if v.is_floating_point())
    assert f"The last checkpoint kept is {path} (epoch 0, step {last['global_step']})" in message
