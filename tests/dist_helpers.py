"""A callback the scale-out tests inject into CLI runs (PYTHONPATH=tests): every process saves its model's weights
at the start and at the end of fit, with its global rank in the file name."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch


class SaveRankWeights(L.Callback):
    def __init__(self, dir: str) -> None:
        self.dir = Path(dir)

    def _save(self, trainer, pl_module, when: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.model.state_dict().items()}
        torch.save(state, self.dir / f"{when}-rank{trainer.global_rank}-of{trainer.world_size}.pt")

    def on_fit_start(self, trainer, pl_module) -> None:
        self._save(trainer, pl_module, "start")

    def on_fit_end(self, trainer, pl_module) -> None:
        self._save(trainer, pl_module, "end")
