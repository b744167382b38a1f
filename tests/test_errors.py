"""One-line errors through the real CLI: exit 2, one line naming the problem and the fix, no traceback, and (for
everything the command line says) before any model is built."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY


def _cli(args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "visionft", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, timeout=300)


_STRATEGIES = sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "strategy").glob("*.yaml"))
CASES = {
    "unknown option": (["strategy=nope"], "strategy=nope is not an option of the strategy group; valid: "
                       + ", ".join(_STRATEGIES)),  # every option the folder holds, whatever gets added
    "unknown option in a sweep": (["-m", "strategy=full,nope"], "strategy=nope is not an option"),
    "unknown option in a list": (["logger=[csv,nope]"], "valid: csv, mlflow, none, tensorboard, wandb"),
    "group typo": (["stratgy=full"], "unknown key stratgy: did you mean strategy?"),
    "key typo": (["trainer.max_epoch=3"], "unknown key trainer.max_epoch: did you mean trainer.max_epochs?"),
    "wrong type": (["trainer.max_epochs=abc"], "trainer.max_epochs=abc must be int (the default is 8)"),
    "wrong type, float": (["strategy.lr=fast"], "strategy.lr=fast must be float"),
    "per_class <= 0": (["data.per_class=0"], "data.per_class=0 must be an integer >= 1"),
    "lr <= 0": (["strategy=lora", "strategy.lr=-1e-3"], "strategy.lr=-0.001 must be > 0"),
    "batch size": (["data.batch_size=0"], "data.batch_size=0 must be an integer >= 1"),
    "unwritable output dir": (["paths.output_dir=/proc/visionft"], "paths.output_dir=/proc/visionft cannot be written"),
    "max_epochs < 1": (["trainer.max_epochs=-5"], "trainer.max_epochs=-5 must be an integer >= 1"),
    "image_size < 0": (["data.image_size=-3"], "data.image_size=-3 must be an integer >= 1"),
    "image_size 0": (["data.image_size=0"], "data.image_size=0 must be an integer >= 1"),
    "unknown precision": (["trainer.precision=bogus"], "trainer.precision=bogus must be one of auto, 32-true, "),
    "label_smoothing > 1": (["loss.label_smoothing=2"], "loss.label_smoothing=2 must be in [0, 1)"),
    "lr inf": (["strategy.lr=inf"], "strategy.lr=inf must be > 0 and finite"),
    "lr overflows to inf": (["strategy.lr=1e400"], "strategy.lr=inf must be > 0 and finite"),
    "fraction": (["data.test_fraction=1.5"], "data.test_fraction=1.5 must be in [0, 1)"),
    "every value of a sweep": (["-m", "data.per_class=4,0"], "data.per_class=0 must be an integer >= 1"),
}


@pytest.mark.parametrize("case", CASES)
def test_command_line_mistakes_are_one_line_before_any_model(case, tmp_path):
    args, expected = CASES[case]
    r = _cli([*args, *(["paths.output_dir=" + str(tmp_path / "run")] if "output_dir" not in " ".join(args) else [])],
             tmp_path, env={"PYTHONPROFILEIMPORTTIME": "1"})  # Python lists every module it imports
    imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    stderr = "\n".join(line for line in r.stderr.splitlines() if not line.startswith("import time:"))
    assert r.returncode == 2, (r.returncode, stderr[-1500:])
    assert "Traceback" not in stderr and "backbone tf_" not in r.stdout + stderr  # no model was built
    assert "hydra" in imported and not {"torch", "lightning", "timm"} & imported  # nor anything heavy imported
    assert stderr.strip().count("\n") == 0, stderr  # one line
    assert stderr.startswith("error: ") and expected in stderr, stderr


def test_hydra_full_error_keeps_hydras_own_report(tmp_path):
    r = _cli(["trainer.max_epoch=3"], tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert r.returncode == 1 and "Traceback" in r.stderr


@pytest.fixture(scope="module")
def three_class_ckpt(tmp_path_factory):
    from conftest import compose_cfg

    from visionft.train import train

    out = tmp_path_factory.mktemp("three")
    return train(compose_cfg([*TINY, "data.num_classes=3"], out))["best_checkpoint"]


def _bad_file(tmp_path, kind):
    path = tmp_path / f"{kind}.ckpt"
    if kind == "corrupt":
        path.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    else:  # pickled Python objects (a class instance): refused by the weights-only loader

        torch.save({"state_dict": {}, "payload": __import__("argparse").Namespace(run="code")}, path)
    return path


@pytest.mark.parametrize("kind, expected", [("corrupt", "is not a readable checkpoint"),
                                            ("pickled", "holds pickled Python objects")])
def test_unusable_checkpoints_are_one_line(tmp_path, kind, expected):
    bad = _bad_file(tmp_path, kind)
    for args in ([*TINY, f"ckpt_path={bad}", f"paths.output_dir={tmp_path / 'run'}"],
                 ["export", "--ckpt", str(bad), "--format", "torchscript"]):
        r = _cli(args, tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-1500:]
        assert expected in r.stderr.strip().splitlines()[-1]


def test_a_checkpoint_of_another_class_count_is_refused(three_class_ckpt, tmp_path):
    args = [*TINY, "data.num_classes=4", f"ckpt_path={three_class_ckpt}", f"paths.output_dir={tmp_path / 'run'}"]
    r = _cli(args, tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-1500:]
    assert "data.num_classes: 3 -> 4" in r.stderr.strip().splitlines()[-1]  # the config says so first
    r = _cli([*args, "resume_changes=allow"], tmp_path)  # and the weights themselves cannot be loaded
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-1500:]
    last = r.stderr.strip().splitlines()[-1]
    assert "does not fit the model of this run" in last and "(3, " in last and "(4, " in last


def test_resuming_with_a_config_that_changes_the_run_is_refused_naming_the_keys(tmp_path):
    from conftest import compose_cfg

    from visionft.train import train

    out = tmp_path / "run"
    train(compose_cfg(TINY, out))  # the runs that must succeed run in-process; the refusal goes through the CLI
    changed = _cli([*TINY, "data.per_class=5", "strategy.lr=1e-3", "trainer.max_epochs=2", "resume=true",
                    f"paths.output_dir={out}"], tmp_path)
    assert changed.returncode == 2 and "Traceback" not in changed.stderr, changed.stderr[-1500:]
    last = changed.stderr.strip().splitlines()[-1]
    assert "data.per_class: None -> 5" in last and "strategy.lr: 0.0005 -> 0.001" in last and "max_epochs" not in last
    longer = train(compose_cfg([*TINY, "trainer.max_epochs=2", "resume=true"], out))  # more epochs: the same run
    assert longer["epochs"] == 2
    forced = train(compose_cfg([*TINY, "strategy.lr=1e-3", "trainer.max_epochs=3", "resume=true",
                                "resume_changes=allow"], out))
    assert forced["epochs"] == 3


def test_real_bugs_keep_their_traceback(tmp_path):
    """A constructor failing with a TypeError is a bug, not bad input: not reduced to our one line (Hydra reports it,
    exit 1, and HYDRA_FULL_ERROR=1 gives its traceback); HYDRA_FULL_ERROR=1 shows a deliberate error's too."""
    args = [*TINY, "+callbacks.bug._target_=math.sqrt", "+callbacks.bug.x=4", f"paths.output_dir={tmp_path / 'a'}"]
    bug = _cli(args, tmp_path)
    assert bug.returncode == 1 and "HYDRA_FULL_ERROR=1" in bug.stderr and not bug.stderr.startswith("error: ")
    traced = _cli(args, tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert "Traceback" in traced.stderr and "TypeError" in traced.stderr
    full = _cli(["data.per_class=0", f"paths.output_dir={tmp_path / 'b'}"], tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert full.returncode != 0 and "Traceback" in full.stderr and "data.per_class=0" in full.stderr


def test_training_settings_that_change_the_run_count_as_changes():
    from visionft.checkpoints import config_changes

    stored = {"trainer": {"precision": "32-true", "accumulate_grad_batches": 1, "max_epochs": 8}, "seed": 1}
    now = {"trainer": {"precision": "bf16-mixed", "accumulate_grad_batches": 2, "max_epochs": 20}, "seed": 1}
    changes = config_changes(stored, now)
    assert changes == ["trainer.accumulate_grad_batches: 1 -> 2", "trainer.precision: '32-true' -> 'bf16-mixed'"]


def test_embed_offline_without_local_weights_is_one_line(tmp_path):
    from PIL import Image

    (tmp_path / "in").mkdir()
    Image.new("RGB", (40, 40), (90, 120, 30)).save(tmp_path / "in" / "a.png")
    empty_cache = tmp_path / "hub"  # no weights cached here, whatever this machine has downloaded
    r = _cli(["embed", "--backbone", "resnet18.a1_in1k", "--inputs", str(tmp_path / "in"), "--out",
              str(tmp_path / "f.npz")], tmp_path, env={"HF_HUB_CACHE": str(empty_cache)})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-1500:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no pretrained weights for backbone 'resnet18.a1_in1k'")
    assert "backbone.pretrained=false" in lines[0] and not (tmp_path / "f.npz").exists()


def _user_error_cases():
    import errno

    from datamodules.images import BadImage
    from visionft.atomic import DiskFull
    from visionft.callbacks import NonFiniteLoss
    from visionft.weights import WeightsUnavailable

    return [WeightsUnavailable("no pretrained weights for backbone 'x'"), NonFiniteLoss("training diverged"),
            DiskFull(errno.ENOSPC, "no space left on the device writing model.pt"), BadImage("empty file (0 bytes)")]


@pytest.mark.parametrize("command", ["export", "predict", "embed", "report"])
def test_every_command_reports_the_training_entry_points_user_errors_as_one_line(command, monkeypatch, capsys):
    """The subcommands catch what training catches (WeightsUnavailable, NonFiniteLoss, DiskFull, a bad image);
    a real bug still raises."""
    from visionft import cli

    for error in _user_error_cases():
        def fail(argv, error=error):
            raise error
        monkeypatch.setitem(cli.COMMANDS, command, fail)
        assert cli.run(command, []) == 2, type(error).__name__
        assert capsys.readouterr().err == f"error: {error}\n"
    monkeypatch.setitem(cli.COMMANDS, command, lambda argv: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cli.run(command, [])


def test_the_precisions_preflight_accepts_are_lightnings():
    import warnings

    import lightning as L

    from visionft.preflight import PRECISIONS, out_of_range

    def lightning_accepts(p) -> bool:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                L.Trainer(precision=p, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
        except ModuleNotFoundError:  # transformer-engine: a valid value whose package is not installed here
            return True
        except ValueError:
            return False
        return True

    for p in [*PRECISIONS[1:], 32, 16, 64, "32", "bf16", "bogus", "bf16-mix", 8, "8-true"]:
        assert (out_of_range("trainer.precision", p) is None) == lightning_accepts(p), p
    assert out_of_range("trainer.precision", "auto") is None  # visionft's own: bf16-mixed where supported, else 32


def test_a_user_error_in_one_job_of_a_multirun_fails_that_job_and_the_next_one_runs(tmp_path):
    """Both values out of range (found once the backbone is built, after the pre-flight): each job records its own
    line in its folder, the second job runs after the first failed, and the command names both and exits 1."""
    sweep = tmp_path / "sweep"
    r = _cli(["-m", *TINY, "strategy=partial", "strategy.freeze_depth=9,12", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert r.returncode == 1, r.stderr[-3000:]
    for job, depth in (("0", 9), ("1", 12)):
        said = (sweep / job / "error.txt").read_text()
        assert said.startswith(f"strategy.freeze_depth={depth} is out of range") and said.count("\n") == 1
        assert f"job {job} failed: {said.strip()}" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: 2 of 2 jobs failed: 0, 1 (`visionft report")
    assert "Traceback" not in r.stderr


def test_help_lists_the_commands_and_the_config_groups_but_not_the_table_rows(tmp_path):
    from visionft.cli import COMMANDS

    r = _cli(["--help"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "powered by Hydra" not in r.stdout
    for command in COMMANDS:
        assert f"visionft {command} " in r.stdout, command
    conf = Path(__file__).parents[1] / "conf"
    section = r.stdout.split("== Config groups")[1].split("== Config (")[0]  # between the two headings
    listed = {line.split(":")[0] for line in section.splitlines() if re.match(r"^[a-z_]+: ", line)}
    groups = {d.name for d in conf.iterdir() if d.is_dir() and any(d.glob("*.yaml"))}
    assert listed == groups - {"row"}
    strategies = next(line for line in r.stdout.splitlines() if line.startswith("strategy: "))
    assert strategies == "strategy: " + ", ".join(sorted(p.stem for p in (conf / "strategy").glob("*.yaml")))
