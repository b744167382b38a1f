"""Procedural, learnable, CIFAR-sized images for tests: no files, no network, deterministic per seed."""
from __future__ import annotations

import numpy as np

from datamodules.base import ClassificationDataModule, Split


def make_images(n: int, num_classes: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class c is an oriented grating (angle and frequency set by c) tinted by a class colour, with random phase,
    contrast, offset and pixel noise, so a small network learns it in a few steps but not trivially."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    rng.shuffle(labels)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    palette = np.random.default_rng(12345).uniform(0.2, 1.0, size=(num_classes, 3)).astype(np.float32)
    angle = np.pi * labels / num_classes
    freq = 2.0 + 3.0 * (labels % 3)
    phase = rng.uniform(0, 2 * np.pi, size=n).astype(np.float32)
    wave = np.sin(
        2 * np.pi * freq[:, None, None] * (np.cos(angle)[:, None, None] * xx + np.sin(angle)[:, None, None] * yy)
        + phase[:, None, None]
    )
    contrast = rng.uniform(0.6, 1.0, size=(n, 1, 1, 1)).astype(np.float32)
    img = 0.5 + 0.35 * contrast * wave[..., None] * palette[labels][:, None, None, :]
    img += rng.normal(0, 0.06, size=img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), labels.astype(np.int64)


class SyntheticDataModule(ClassificationDataModule):
    def __init__(self, num_classes: int = 10, train_size: int = 512, test_size: int = 128, native_size: int = 32,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.n_classes, self.train_size, self.test_size, self.native_size = (
            num_classes, train_size, test_size, native_size,
        )

    def load_splits(self):
        train = make_images(self.train_size, self.n_classes, self.native_size, self.seed)
        test = make_images(self.test_size, self.n_classes, self.native_size, self.seed + 10_000)
        return Split(*train), None, Split(*test), [f"class_{c}" for c in range(self.n_classes)]
