"""Exact resume: with deterministic=true two runs end with identical weights, and a run killed with SIGKILL at three
points (mid-epoch, right after an unfreeze, right after a validation) and resumed with resume=true ends with weights
bit-identical to the uninterrupted run, having seen every training batch (same samples, same augmentations) exactly
once per epoch across the crash. Augmentation (random-resized crop + flip) and dropout are on; checkpoints are also
written mid-epoch (val_check_interval=0.5)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY
from resume_helpers import last_weights, records, run_recorded

pytestmark = pytest.mark.slow
RUN = [o for o in TINY if not o.startswith("trainer.max_epochs")] + [
    "strategy=gradual_unfreeze", "+backbone.kwargs.drop_rate=0.3", "data.augment.name=crop_flip",
    "+trainer.val_check_interval=0.5", "trainer.max_epochs=4", "deterministic=true"]
PER_SAMPLE, RESIDENT = "data.resident=false", "data.resident=true"  # the two data paths (datamodules.resident)
STEPS_PER_EPOCH = 9  # 144 training images, batch 16, drop_last


def _reference(root: Path, path: str):
    done = run_recorded(RUN, root / "run", root / "batches.txt", path)
    assert done.returncode == 0, done.stderr[-3000:]
    return last_weights(root / "run"), records(root / "batches.txt")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _reference(tmp_path_factory.mktemp("reference"), PER_SAMPLE)


@pytest.fixture(scope="module")
def reference_resident(tmp_path_factory):
    return _reference(tmp_path_factory.mktemp("reference_resident"), RESIDENT)


def test_two_deterministic_runs_give_identical_weights(reference, tmp_path):
    done = run_recorded(RUN, tmp_path / "run", tmp_path / "batches.txt", PER_SAMPLE)
    assert done.returncode == 0, done.stderr[-3000:]
    weights, batches = reference
    assert records(tmp_path / "batches.txt") == batches
    again = last_weights(tmp_path / "run")
    assert all(torch.equal(again[k], v) for k, v in weights.items())


@pytest.mark.parametrize("kill_step, workers", [
    (STEPS_PER_EPOCH + 6, 0),  # mid-epoch 1, after its mid-epoch validation and checkpoint
    (2 * STEPS_PER_EPOCH + 1, 0),  # the first step of epoch 2, right after gradual unfreezing opened another group
    (2 * STEPS_PER_EPOCH + 6, 2),  # right after epoch 2's mid-epoch validation; 2 persistent loader workers
])
def test_sigkill_then_resume_is_bit_identical_and_sees_each_batch_once(reference, tmp_path, kill_step, workers):
    """The reference ran without workers: with 2 worker processes the batches must still be the same."""
    _kill_resume_compare(reference, tmp_path, kill_step, PER_SAMPLE, f"data.num_workers={workers}")


def test_resident_data_sigkill_then_resume_is_bit_identical(reference_resident, tmp_path):
    """The device-resident path (batches augmented on the device): killed mid-epoch right after a validation and
    a mid-epoch checkpoint, resumed, it matches its own uninterrupted run batch for batch and weight for weight."""
    _kill_resume_compare(reference_resident, tmp_path, STEPS_PER_EPOCH + 6, RESIDENT)


def _kill_resume_compare(reference, tmp_path, kill_step: int, *extra: str) -> None:
    out, crashed, resumed = tmp_path / "run", tmp_path / "crashed.txt", tmp_path / "resumed.txt"
    killed = run_recorded(RUN, out, crashed, "+callbacks.killer._target_=resume_helpers.Killer",
                  f"+callbacks.killer.step={kill_step}", *extra)
    assert killed.returncode == -9, killed.stderr[-3000:]
    # the resume re-applies the run's own overrides (its folder's overrides.yaml), the killer's too: disarm it
    done = run_recorded(RUN, out, resumed, "resume=true", "+callbacks.killer.step=-1", *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    weights, batches = reference
    after = records(resumed)
    start = int(after[0][0])  # the step the resumed run continued from (its last checkpoint)
    assert 0 < start <= kill_step
    stitched = [r for r in records(crashed) if int(r[0]) < start] + after
    assert stitched == batches  # every step once, with the same samples in the same order, augmented alike
    final = last_weights(out)
    assert all(torch.equal(final[k], v) for k, v in weights.items())
