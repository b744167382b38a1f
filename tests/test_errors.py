"""One-line errors through the real CLI: exit 2, one line naming the problem and the fix, no traceback, and (for
everything the command line says) before any model is built."""
from __future__ import annotations

import os
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
}


@pytest.mark.parametrize("case", CASES)
def test_command_line_mistakes_are_one_line_before_any_model(case, tmp_path):
    args, expected = CASES[case]
    r = _cli([*args, *(["paths.output_dir=" + str(tmp_path / "run")] if "output_dir" not in " ".join(args) else [])],
             tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr[-1500:])
    assert "Traceback" not in r.stderr and "backbone tf_" not in r.stdout + r.stderr  # no model was built
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last, last


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
