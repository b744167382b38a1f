"""Reports: every run leaves one in its directory (``visionft.report.run``); a sweep's runs are collected into one
(``visionft.report.sweep``). ``visionft report PATH`` (re)builds either from the files alone."""
from __future__ import annotations

from pathlib import Path

from visionft.errors import UsageError


def build(path: str | Path, metric: str | None = None, seed_key: str = "seed") -> list[Path]:
    """The report of a run directory (it has ``metrics.json``) or of a sweep directory (runs below it, compared on
    ``metric``: by default the validation metric they monitored)."""
    from visionft.report import run, sweep

    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"{path} is not a directory: pass a run directory (with metrics.json) or a sweep directory")
    if (path / "metrics.json").is_file():
        return run.write(path)
    if sweep.jobs(path):
        return sweep.write(path, metric, seed_key)
    raise UsageError(f"{path} holds no run (no metrics.json) and no sweep (no */.hydra/overrides.yaml or "
                     f"*/metrics.json): pass a run or multirun directory")
