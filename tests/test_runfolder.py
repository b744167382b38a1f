"""One run per output folder: a folder in use by a running visionft process is refused, a folder holding a run is
refused unless resumed or ``overwrite=true`` (which leaves none of the old run's files), and no output or cache
folder may lie inside ``data.root``. Through the real CLI (one line, exit 2, nothing written) and ``train()``."""
from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import TINY, compose_cfg
from PIL import Image

from visionft.errors import UsageError
from visionft.train import train

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def _cli(args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "visionft", *map(str, args)], check=False, capture_output=True,
                          text=True, cwd=cwd, env=ENV, timeout=300)


def _one_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr[-2000:]
    assert r.stderr.startswith("error: ")
    return r.stderr.strip()[len("error: "):]


def _files(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (but the lock) and a hash of its bytes."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def _free(out: Path) -> bool:
    """Whether another process could lock the folder now (an flock of its own, not visionft's code)."""
    with open(out / ".lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished run, trained in-process; each test works on its own copy."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(compose_cfg(TINY, out))
    return out


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def test_a_folder_in_use_by_a_running_run_is_refused_and_a_killed_run_leaves_no_lock(tmp_path):
    out = tmp_path / "run"
    hold = ["+callbacks.hold._target_=time.sleep", "+callbacks.hold._args_=[600]"]  # built after set-up: it waits
    first = subprocess.Popen([sys.executable, "-m", "visionft", *TINY, *hold, f"paths.output_dir={out}"],
                             cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    try:
        start = time.time()
        while not (out / ".hydra" / "overrides.yaml").exists():  # the first run has started: Hydra's record of it
            assert first.poll() is None, first.communicate()[1][-2000:]
            assert time.time() - start < 120
            time.sleep(0.05)
        line = _one_line(_cli([*TINY, "seed=3", f"paths.output_dir={out}"], tmp_path))
        assert line.startswith(f"{out} is in use by another visionft run (pid {first.pid} on ")
        assert line.endswith("): wait for it to finish or pass another paths.output_dir")
        assert "seed=3" not in (out / ".hydra" / "overrides.yaml").read_text()  # the running run's record is its own
        fds = len(os.listdir("/proc/self/fd"))
        with pytest.raises(UsageError, match=re.escape(f"in use by another visionft run (pid {first.pid} on ")):
            train(compose_cfg([*TINY, "seed=3"], out))  # the Python API alike
        assert len(os.listdir("/proc/self/fd")) == fds
        assert not _free(out) and first.poll() is None
    finally:
        first.kill()  # SIGKILL: no clean-up code runs
        first.wait()
    assert _free(out)  # the kernel dropped the killed run's lock


def test_train_releases_the_lock_when_it_raises_and_other_ranks_take_none(tmp_path, monkeypatch):
    out = tmp_path / "run"
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(UsageError, match="leaves the backbone as it was"):  # refused after the folder was taken
        train(compose_cfg([*TINY, "strategy=linear_probe", "wise.alphas=[0,1]"], out))
    assert (out / ".lock").is_file() and _free(out) and len(os.listdir("/proc/self/fd")) == fds
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "last.ckpt").write_bytes(b"a run's checkpoint")
    monkeypatch.setenv("LOCAL_RANK", "1")  # a process Lightning's DDP started for rank 1: rank 0 holds the folder
    with pytest.raises(UsageError, match="leaves the backbone as it was"):
        train(compose_cfg([*TINY, "strategy=linear_probe", "wise.alphas=[0,1]"], out))


def test_a_folder_holding_a_run_is_refused_and_left_as_it_was(finished, tmp_path):
    out = _copy(finished, tmp_path / "run")
    before = _files(out)
    line = _one_line(_cli([*TINY, "seed=3", f"paths.output_dir={out}"], tmp_path))
    assert line == (f"{out} holds a finished run (metrics.json, checkpoints/best.ckpt, checkpoints/last.ckpt): resume "
                    f"it with `python -m visionft resume=true paths.output_dir={out}`, pass overwrite=true to replace "
                    f"it, or choose another paths.output_dir")
    assert _files(out) == before  # every byte as it was, .hydra/ and the log included

    (out / "metrics.json").unlink()  # killed before its end: unfinished
    with pytest.raises(UsageError, match=r"holds an unfinished run \(checkpoints/best.ckpt, checkpoints/last.ckpt\): "
                                         r"resume it with `python -m visionft resume=true"):
        train(compose_cfg([*TINY, "seed=3"], out))
    with pytest.raises(UsageError, match="overwrite=true would remove the run in .* that resume=true continues"):
        train(compose_cfg([*TINY, "resume=true", "overwrite=true"], out))
    assert _files(out) == {k: v for k, v in before.items() if k != "metrics.json"}


def test_overwrite_replaces_the_run_and_leaves_none_of_its_files(finished, tmp_path):
    out = _copy(finished, tmp_path / "run")
    old = {"export/onnx/model.onnx", "wise/alpha_curve.csv", "checkpoints/final.ckpt", "checkpoints/best-v1.ckpt",
           "bad_images.csv", ".hydra/overrides.yaml"}  # what an older run (or a CLI one) may have left beside them
    for name in old:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("- seed=999\n" if name.endswith("overrides.yaml") else "old")
    hour_ago = time.time() - 3600
    for name in _files(out):
        os.utime(out / name, (hour_ago, hour_ago))
    rows = len((out / "csv" / "metrics.csv").read_text().splitlines())
    m = train(compose_cfg([*TINY, "seed=3", "++overwrite=true"], out))  # '++': a key c4a2980 did not have
    stale = sorted(k for k in _files(out) if (out / k).stat().st_mtime < hour_ago + 60)
    assert stale == []  # nothing from before this run
    assert m["final_checkpoint"].endswith("best.ckpt") and _free(out)
    assert len((out / "csv" / "metrics.csv").read_text().splitlines()) == rows  # one run's rows, not two
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 3
    assert "seed=999" not in (out / "README.md").read_text()  # the card's command is not the old .hydra/ record


def test_a_sweep_into_a_folder_holding_an_earlier_sweep_is_refused(finished, tmp_path):
    root = tmp_path / "sweep"
    _copy(finished, root / "0")
    before = _files(root)
    line = _one_line(_cli(["-m", *TINY, "seed=3,4", f"paths.output_dir={root}"], tmp_path))
    assert line == (f"{root} holds the runs of an earlier sweep (jobs 0): pass overwrite=true to replace them, or "
                    f"choose another paths.output_dir")
    assert _files(root) == before


def _flat_folder(root: Path) -> Path:
    """root/<class>/*.png: a flat image folder (split by fractions)."""
    for k, c in enumerate(("ants", "bees")):
        (root / c).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (8, 8), (120 * k, 12 * i, 60)).save(root / c / f"{i}.png")
    return root


FOLDER = [o for o in TINY if not o.startswith(("data=", "data.train_size", "data.test_size"))] + [
    "data=imagefolder", "data.num_workers=0", "data.image_size=32", "data.batch_size=4"]


def test_an_output_or_cache_folder_inside_the_data_is_refused_before_anything_is_written(tmp_path):
    root = _flat_folder(tmp_path / "photos")
    before = _files(root)
    line = _one_line(_cli([*FOLDER, f"data.root={root}", f"paths.output_dir={root / 'run1'}"], tmp_path))
    assert line == (f"paths.output_dir={root / 'run1'} is inside data.root={root}: the run would write into the data, "
                    f"where its files are read as images (a folder of them as a class): pass a paths.output_dir "
                    f"outside {root}")
    line = _one_line(_cli([*FOLDER, "data.root=."], root))  # run from the data folder: Hydra's outputs/ there
    assert line.startswith("the run folder outputs/ (Hydra's default, in the current folder) is inside data.root=.:")

    with pytest.raises(UsageError, match=re.escape(f"paths.cache_dir={root / 'cache'} is inside data.root={root}: ")):
        train(compose_cfg([*FOLDER, f"data.root={root}", f"paths.cache_dir={root / 'cache'}"], tmp_path / "run"))
    with pytest.raises(UsageError, match=re.escape(f"paths.output_dir={root}/b/c is inside data.root={root}/: ")):
        train(compose_cfg([*FOLDER, f"data.root={root}/"], f"{root}/b/c"))
    assert _files(root) == before and sorted(p.name for p in root.iterdir()) == ["ants", "bees"]


def test_a_run_started_with_overwrite_resumes_with_its_printed_command(finished, tmp_path):
    """The resume command a stop prints replays the run's own overrides; ``overwrite=true`` is not one it carries
    (it would remove the run it continues), nor is it in the card's Reproduce command."""
    from visionft.resume import with_run_overrides

    out = _copy(finished, tmp_path / "run")
    (out / "overrides.yaml").write_text(yaml.safe_dump([*TINY, "++overwrite=true"]))
    argv = with_run_overrides(["resume=true", f"paths.output_dir={out}"])
    assert not any("overwrite" in a for a in argv)
    m = train(compose_cfg([a for a in argv if not a.startswith("paths.output_dir=")] + ["trainer.max_epochs=2"],
                          out))
    assert m["epochs"] == 2 and m["resumed"]
    assert "overwrite" not in (out / "README.md").read_text()


def test_overwrite_never_clears_a_folder_no_visionft_run_wrote(tmp_path):
    """Another tool's folder (its own checkpoints/*.ckpt and README) is refused even with overwrite=true, untouched."""
    out = tmp_path / "project"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "model.ckpt").write_bytes(b"not visionft's")
    (out / "README.md").write_text("my notes")
    before = _files(out)
    with pytest.raises(UsageError, match="holds files no visionft run wrote"):
        train(compose_cfg([*TINY, "++overwrite=true"], out))
    assert _files(out) == before


def test_a_second_sweep_into_a_folder_a_sweep_is_using_is_refused(tmp_path):
    """The launching process of a sweep holds its root: another sweep into it is refused before Hydra starts."""
    root = tmp_path / "sweep"
    root.mkdir()
    with open(root / ".lock", "a") as held:  # a running sweep's lock (an flock of the test's own)
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        line = _one_line(_cli(["-m", *TINY, "seed=3,4", f"paths.output_dir={root}"], tmp_path))
    assert line.startswith(f"{root} is in use by another visionft run")
    assert sorted(p.name for p in root.iterdir()) == [".lock"]
