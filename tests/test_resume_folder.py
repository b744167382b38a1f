"""Resuming from the run folder alone: `python -m visionft resume=true paths.output_dir=RUN` runs with the run's
own overrides (overrides given beside it apply on top), and the stop message prints exactly that command."""
from __future__ import annotations

import shlex
import signal
import sys
from pathlib import Path

import lightning as L
import pytest
import yaml
from conftest import TINY
from hydra.core.override_parser.overrides_parser import OverridesParser

from visionft.resume import resume_command, with_run_overrides

STORED = ["data=synthetic", "backbone.name=test_resnet", "trainer.max_epochs=1", "ckpt_path=/runs/start.ckpt",
          "+callbacks.r._target_=m.R", "resume=true", "paths.output_dir=/where/it/ran"]


def _run_folder(tmp_path: Path, where: str = "overrides.yaml") -> Path:
    run = tmp_path / "run"
    (run / Path(where).parent).mkdir(parents=True, exist_ok=True)
    (run / where).write_text(yaml.safe_dump(STORED))
    return run


@pytest.mark.parametrize("where", ["overrides.yaml", ".hydra/overrides.yaml"])
def test_resume_brings_the_runs_own_overrides_and_the_command_line_applies_on_top(tmp_path, where):
    run = _run_folder(tmp_path, where)
    argv = ["resume=true", f"paths.output_dir={run}", "trainer.max_epochs=3"]
    # the stored ones it does not set again, before its own; never the checkpoint the run began from
    assert with_run_overrides(argv) == ["data=synthetic", "backbone.name=test_resnet", "+callbacks.r._target_=m.R",
                                        *argv]
    assert with_run_overrides(["--config-dir", "/c", *argv]) == ["--config-dir", "/c", "data=synthetic",
                                                                 "backbone.name=test_resnet",
                                                                 "+callbacks.r._target_=m.R", *argv]
    api = with_run_overrides(["resume=true"], output_dir=run)  # visionft.fit(["resume=true"], output_dir=RUN)
    assert api == ["data=synthetic", "backbone.name=test_resnet", "trainer.max_epochs=1",
                   "+callbacks.r._target_=m.R", "resume=true"]


@pytest.mark.parametrize("argv", [["resume=false", "paths.output_dir={run}"], ["paths.output_dir={run}"],
                                  ["-m", "resume=true", "paths.output_dir={run}"], ["resume=true"]])
def test_other_command_lines_are_left_as_they_are(tmp_path, argv):
    argv = [a.format(run=_run_folder(tmp_path)) for a in argv]
    assert with_run_overrides(argv) == argv


@pytest.mark.parametrize("name", ["run", "out dir (v1), a=b, ü", "it's", 'q"uote', "back\\slash\\"])
def test_the_resume_command_survives_the_shell_and_hydras_grammar(tmp_path, name):
    args = shlex.split(resume_command(tmp_path / name))
    assert args[:4] == ["python", "-m", "visionft", "resume=true"] and len(args) == 5
    override = OverridesParser.create().parse_overrides(args[4:])[0]
    assert override.key_or_group == "paths.output_dir" and override.value() == str(tmp_path / name)


class StopMidEpoch(L.Callback):
    """Sends this process SIGTERM (a scheduler's preemption) at epoch 1, batch 2."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == 1 and batch_idx == 2:
            signal.raise_signal(signal.SIGTERM)


def test_a_stopped_run_resumes_from_its_folder_alone_with_the_printed_command(tmp_path, monkeypatch, capsys):
    from visionft.__main__ import main

    run, record = tmp_path / "run", tmp_path / "batches.txt"
    args = [*(o for o in TINY if not o.startswith("trainer.max_epochs")), "trainer.max_epochs=2",
            "+callbacks.recorder._target_=resume_helpers.Recorder", f"+callbacks.recorder.path={record}",
            f"+callbacks.stop._target_={__name__}.StopMidEpoch", "logger=none", f"paths.output_dir={run}"]
    monkeypatch.setattr(sys, "argv", ["visionft", *args])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 143
    line = capsys.readouterr().err.strip().splitlines()[-1]
    command = resume_command(run)
    assert line.startswith("stopped: SIGTERM received") and line.endswith(f"Resume with: {command}"), line
    stopped = len(record.read_text().splitlines())
    monkeypatch.setattr(sys, "argv", ["visionft", *shlex.split(command)[3:]])  # exactly what the line says
    main()
    import json

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["backbone"] == "test_resnet"  # the run's own overrides
    steps = [int(line.split()[0]) for line in record.read_text().splitlines()]
    per_epoch = metrics["steps_per_epoch"]
    assert steps == list(range(2 * per_epoch)) and stopped == per_epoch + 3  # each step once: continued
