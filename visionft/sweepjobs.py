"""A sweep's failed jobs. In a multirun, a job stopped by a user error (a value out of range, a missing file: the
one line a single run prints before exit 2) fails alone: the line is written to ``error.txt`` in the job's folder
and to its log, the job returns no objective, and the launcher goes on with the next job. When the sweep is over,
``FailedJobs`` (a Hydra callback, set in conf/config.yaml) prints each failed job's line and a summary, and the
command exits 1. It reads the jobs' folders, so it works with any launcher (local, joblib, submitit)."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

ERROR_FILE = "error.txt"
failed: list[Path] = []  # this process's sweep: the folders of its failed jobs, in job order


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def clear(job: Path) -> None:
    """A job starting in a folder that an earlier sweep's failed job left: that failure is not this job's."""
    (job / ERROR_FILE).unlink(missing_ok=True)


def record(job: Path, line: str) -> None:
    logging.getLogger("visionft").error("error: %s", line)  # the job's log (and the console)
    try:
        job.mkdir(parents=True, exist_ok=True)
        (job / ERROR_FILE).write_text(line + "\n")
    except OSError as e:  # the log keeps the line; the sweep goes on
        logging.getLogger("visionft").error("could not write %s: %s", job / ERROR_FILE, e)


def reason(job: Path) -> str | None:
    """The recorded one-line reason a job failed, or None."""
    path = job / ERROR_FILE
    if not path.is_file():
        return None
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[0] if lines else "failed (empty error.txt)"


def _numbered(root: Path) -> list[Path]:
    dirs = [d for d in root.iterdir() if d.is_dir() and d.name.isdigit()] if root.is_dir() else []
    return sorted(dirs, key=lambda d: int(d.name))


class FailedJobs(Callback):
    """After a multirun: each job folder (under ``hydra.sweep.dir``, and ``paths.output_dir`` when set) whose
    ``error.txt`` this sweep wrote, one line each, then ``error: N of M jobs failed: <numbers>``."""

    def __init__(self) -> None:
        self.start = time.time()

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.start = time.time() - 1  # file times may be a little coarser than the clock
        failed.clear()

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep = Path(str(config.hydra.sweep.dir))
        roots = [sweep] + ([Path(str(config.paths.output_dir))] if config.get("paths", {}).get("output_dir") else [])
        ran = [d for d in _numbered(sweep) if _newer(d / ".hydra", self.start)]
        found = {d.name: d for root in roots for d in _numbered(root) if _newer(d / ERROR_FILE, self.start)}
        failed[:] = [found[k] for k in sorted(found, key=int)]
        for job in failed:
            print(f"job {job.name} failed: {reason(job)} ({job / ERROR_FILE})", file=sys.stderr)
        if failed:
            of = f" of {len(ran)}" if len(ran) >= len(failed) else ""
            others = "; the others ran" if len(ran) > len(failed) else ""
            print(f"error: {len(failed)}{of} jobs failed: {', '.join(j.name for j in failed)}{others} "
                  f"(`visionft report {roots[-1]}` lists every job)", file=sys.stderr)


def _newer(path: Path, start: float) -> bool:
    try:
        return path.stat().st_mtime >= start
    except OSError:
        return False
