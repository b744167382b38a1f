"""scikit-learn's bundled handwritten digits: 1,797 real 8x8 grayscale images, 10 classes (works offline)."""
from __future__ import annotations

import numpy as np

from datamodules.base import ClassificationDataModule, Split


class DigitsDataModule(ClassificationDataModule):
    """Digits as RGB uint8 (0..16 intensities scaled to 0..255, gray replicated to 3 channels). Test and val are
    stratified, seeded fractions; images are upsampled to the input size by the transforms."""

    def load_splits(self):
        from sklearn.datasets import load_digits

        d = load_digits()
        gray = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        rgb = np.repeat(gray[..., None], 3, axis=-1)
        return Split(rgb, d.target.astype(np.int64)), None, None, [str(c) for c in range(10)]
