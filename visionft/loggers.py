"""Lightning's CSV logger that keeps its history across a resume (Lightning's deletes ``metrics.csv`` when a new
logger opens the folder). The other loggers are Lightning's own, chosen by the Hydra group ``logger``."""
from __future__ import annotations

import csv
import os
from pathlib import Path

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class ResumableCSVLogger(CSVLogger):
    """``append=True`` (a resumed run) continues ``metrics.csv`` instead of starting it anew: the file is moved
    aside while Lightning's writer opens the folder, then put back, its header naming the columns already written."""

    def __init__(self, *args, append: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.append, self._opened = append, False

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._opened or not self.append:
            return super().experiment
        metrics = Path(self.log_dir) / ExperimentWriter.NAME_METRICS_FILE
        aside = metrics.with_name(metrics.name + ".resumed")
        history = metrics.is_file()
        if history:
            os.replace(metrics, aside)
        try:
            writer = super().experiment
        finally:
            if history:
                os.replace(aside, metrics)
        if history:
            with open(metrics, newline="") as f:
                writer.metrics_keys = sorted(csv.DictReader(f).fieldnames or [])
        self._opened = True
        return writer
