"""Training batches that are a pure function of (seed, epoch, position), so a run killed at any step and resumed
sees exactly the samples, order and augmentations an uninterrupted run sees.

- ``EpochOrder``: the epoch's shuffle is ``randperm(n)`` from a generator seeded by (seed, epoch); it yields
  ``(epoch, index)`` keys, and ``SeededDataset`` seeds the augmentation of each sample by (seed, epoch, index), so
  the result does not depend on worker processes or on what ran before. With per-sample ``weights``
  (``data.sampler=balanced``: 1 / the sample's class count) the epoch is instead ``n`` draws with replacement
  (torch's ``WeightedRandomSampler``, same generator), keyed ``(epoch, index, draw)`` so that an image drawn twice
  is augmented twice, differently.
- ``ResumableLoader``: a DataLoader with Lightning's ``state_dict``/``load_state_dict`` protocol: its state is the
  epoch and the number of batches the loop has taken; after a mid-epoch restore its next iteration skips those
  batches. The epoch of a fresh iteration is the trainer's (read when the iterator is created, before any worker
  prefetches). Worker seeds come from the loader's own generator: iterating never touches the global RNG.
"""
from __future__ import annotations

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    Sampler,
    WeightedRandomSampler,
)


def mix(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix-style), stable across processes and Python versions."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class SeededDataset(Dataset):
    """Wraps a dataset whose ``transform`` is an albumentations Compose: item ``(epoch, i)`` is item ``i`` with its
    augmentation seeded by (seed, epoch, i)."""

    def __init__(self, dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, i, *draw = key if isinstance(key, tuple) else (0, key)
        self.dataset.transform.set_random_seed(mix(self.seed, epoch, i, *draw) % (2**32))
        return self.dataset[i]


class EpochOrder(Sampler):
    """The (epoch, index) keys of one epoch: shuffled by (seed, epoch) or in order, from position ``skip`` on; with
    ``weights`` (one per sample), ``n`` weighted draws with replacement by (seed, epoch), keyed (epoch, index, draw)."""

    def __init__(self, n: int, seed: int, shuffle: bool, weights: torch.Tensor | None = None) -> None:
        self.n, self.seed, self.shuffle, self.weights = n, int(seed), shuffle, weights
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this; the loader has already fixed the epoch
        pass

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(mix(self.seed, self.epoch))
        if self.weights is not None:
            return list(WeightedRandomSampler(self.weights, self.n, replacement=True, generator=g))
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self):
        epoch, keys, skip = self.epoch, self.order(), self.skip
        self.skip = 0
        if self.weights is not None:
            return iter([(epoch, i, k) for k, i in enumerate(keys) if k >= skip])
        return iter([(epoch, i) for i in keys[skip:]])

    def __len__(self) -> int:
        return self.n


class Position:
    """The checkpointed position of a training loader (Lightning's ``state_dict``/``load_state_dict`` protocol): the
    epoch and the batches handed out. Needs ``self.order`` (an ``EpochOrder``), ``self.trainer_of``, and
    ``self.taken``/``self._resume`` set to 0/None."""

    def state_dict(self) -> dict:
        return {"epoch": self.order.epoch, "batches": self.taken}

    def load_state_dict(self, state: dict) -> None:
        self._resume = (int(state["epoch"]), int(state["batches"]))

    def start_epoch(self) -> int:
        """Fix this iteration's epoch (the trainer's) and return the batches to skip: a saved position applies only
        to its own epoch (an end-of-epoch checkpoint starts the next one afresh)."""
        trainer = self.trainer_of()
        epoch = trainer.current_epoch if trainer is not None else 0
        resume, self._resume = self._resume, None
        self.order.epoch, skipped = resume if resume is not None and resume[0] == epoch else (epoch, 0)
        self.taken = skipped
        return skipped


class ResumableLoader(Position, DataLoader):
    """A training DataLoader over ``SeededDataset`` keys whose position survives a checkpoint (see module doc)."""

    def __init__(self, dataset: SeededDataset, batch_size: int, shuffle: bool, drop_last: bool, seed: int,
                 trainer_of=lambda: None, **kwargs) -> None:
        order = EpochOrder(len(dataset), seed, shuffle)
        super().__init__(dataset, batch_sampler=BatchSampler(order, batch_size, drop_last),
                         generator=torch.Generator().manual_seed(mix(seed, 1)), **kwargs)
        self.order, self.trainer_of = order, trainer_of
        self.taken, self._resume = 0, None

    def __iter__(self):
        self.order.skip = self.start_epoch() * self.batch_sampler.batch_size
        for batch in super().__iter__():
            self.taken += 1
            yield batch
