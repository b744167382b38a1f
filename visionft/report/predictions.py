"""The final model's test predictions, kept for the report: every test image's class probabilities and label (in the
test split's order), and the most confidently wrong images as the model saw them. Written to
``<run>/predictions/test.npz`` so that ``visionft report RUN_DIR`` can rebuild every table and figure from files."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch

from visionft.atomic import replacing

FILE = Path("predictions") / "test.npz"
WRONG = 25  # images in the most-confidently-wrong grid


class TestPredictions(L.Callback):
    """Collects softmax probabilities and labels during ``trainer.test`` (the module's ``test_step`` returns its
    logits), on the device, one transfer at the end. Under DDP every rank's share is gathered and put back in the
    dataset's order (the distributed sampler deals indices round-robin and pads the last round)."""

    def __init__(self) -> None:
        self.probs: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.result: tuple[np.ndarray, np.ndarray] | None = None

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self.probs, self.labels, self.result = [], [], None

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if isinstance(outputs, torch.Tensor):
            self.probs.append(outputs.detach().float().softmax(-1))
            self.labels.append(batch[1].detach())

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        if not self.probs:
            return
        probs, labels = torch.cat(self.probs), torch.cat(self.labels)
        if trainer.world_size > 1:
            n = len(trainer.test_dataloaders.dataset) if hasattr(trainer.test_dataloaders, "dataset") else None
            probs, labels = (_interleave(pl_module.all_gather(t), n) for t in (probs, labels))
        self.result = probs.cpu().numpy(), labels.cpu().numpy()
        self.probs, self.labels = [], []


def _interleave(gathered: torch.Tensor, n: int | None) -> torch.Tensor:
    """(world, per_rank, ...) from ranks that took indices r, r + world, ... -> dataset order, padding dropped."""
    flat = gathered.transpose(0, 1).reshape(-1, *gathered.shape[2:])
    return flat[:n] if n is not None else flat


def feature_probs(module, features) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities of the model's head on cached test features (the probe path, which runs no test loop)."""
    from visionft.probe import feature_logits

    return feature_logits(module, features).softmax(-1).numpy(), features.y.numpy()


def most_confidently_wrong(probs: np.ndarray, labels: np.ndarray, k: int = WRONG) -> np.ndarray:
    """Indices of up to ``k`` misclassified images, highest predicted probability first."""
    pred, conf = probs.argmax(1), probs.max(1)
    wrong = np.flatnonzero(pred != labels)
    return wrong[np.argsort(-conf[wrong], kind="stable")][:k]


def save(out: Path, probs: np.ndarray, labels: np.ndarray, classes: list[str], dm) -> Path:
    """``predictions/test.npz``: probs (float32, N x C), labels, classes, and the most confidently wrong images
    (their indices, the evaluation view the model saw as HWC uint8, and file paths where the split has them)."""
    index = most_confidently_wrong(probs, labels)
    dataset = dm.dataset("test")
    images = [np.asarray(dataset[int(i)][0]).transpose(1, 2, 0) for i in index]  # CHW uint8 -> HWC
    paths = dm.splits["test"].images
    wrong_paths = [str(paths[int(i)]) for i in index] if not isinstance(paths, np.ndarray) else ["" for _ in index]
    path = out / FILE
    with replacing(path, "predictions file") as tmp, open(tmp, "wb") as f:  # a file object: no '.npz' appended
        np.savez_compressed(f, probs=probs.astype(np.float32), labels=labels.astype(np.int64),
                            classes=np.asarray(classes, dtype=str), wrong_index=index.astype(np.int64),
                            wrong_images=np.stack(images) if images else np.zeros((0, 1, 1, 3), np.uint8),
                            wrong_paths=np.asarray(wrong_paths, dtype=str))
    return path


def load(run: Path) -> dict | None:
    path = run / FILE
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
