"""How many images an evaluation really used: ``trainer.limit_val_batches`` / ``limit_test_batches`` evaluate a part of
a split, and every number computed on it says so (``val/images``, ``test/images`` in ``metrics.json``)."""
from __future__ import annotations

import lightning as L
import torch


class EvaluatedImages(L.Callback):
    """Counts the images of every batch the validation and test loops evaluate, summed over processes (at most the
    split's size: a distributed sampler pads the last round with repeats)."""

    def __init__(self) -> None:
        self.images: dict[str, int] = {}
        self._seen = 0

    def _start(self, *_) -> None:
        self._seen = 0

    def _batch(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._seen += len(batch[1])

    def _end(self, stage: str, trainer, pl_module) -> None:
        seen = torch.tensor(self._seen, device=pl_module.device)
        total = int(trainer.strategy.reduce(seen, reduce_op="sum")) if trainer.world_size > 1 else self._seen
        splits = getattr(getattr(trainer, "datamodule", None), "splits", None) or {}
        self.images[stage] = min(total, len(splits[stage])) if stage in splits else total

    on_validation_epoch_start = on_test_epoch_start = _start
    on_validation_batch_end = on_test_batch_end = _batch

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._end("val", trainer, pl_module)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._end("test", trainer, pl_module)

    def of(self, stage: str) -> dict[str, int]:
        """``{"<stage>/images": n}``, or nothing when the stage did not run."""
        return {f"{stage}/images": self.images[stage]} if stage in self.images else {}


def evaluate(trainer: L.Trainer, module: L.LightningModule, dm) -> tuple[dict, dict]:
    """Val and test metrics, each with the number of images it was computed on (``val/images``, ``test/images``:
    what the loops evaluated, a part of the split under ``trainer.limit_val_batches`` / ``limit_test_batches``)."""
    counted = EvaluatedImages()
    trainer.callbacks.append(counted)
    try:
        val = trainer.validate(module, datamodule=dm, verbose=False)[0]
        test = trainer.test(module, datamodule=dm, verbose=False)[0] if dm.sizes()["test"] else {}
    finally:
        trainer.callbacks.remove(counted)
    return val | counted.of("val"), test | counted.of("test") if test else {}
