"""Samplers that make training resumable bit-for-bit and distributed evaluation exact.

* :class:`EpochSampler` (training): the shuffle order is a function of ``(seed, epoch)`` only, and the
  global RNGs (``random``, NumPy, torch) are re-seeded from ``(seed, epoch, rank)`` at the moment the
  epoch's first index is drawn, i.e. just before the first sample is loaded and augmented. Lightning
  creates the loader iterator at different points for a fresh epoch and for the first epoch after a
  resume; seeding inside the sampler is the one place that is the same in both, so a run killed after
  an epoch and resumed from its checkpoint draws the same augmentations and CT samples as an
  uninterrupted one (with ``num_workers=0``; worker processes have their own RNGs, seeded by the
  datamodule).
* :class:`UnpaddedDistributedSampler` (validation / test): each rank gets a disjoint share of the
  samples and none is duplicated (``DistributedSampler`` pads to a multiple of the world size, which
  counts the padded samples twice in the confusion matrix).

Both subclass ``DistributedSampler`` so that Lightning leaves them in place.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sized

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler


def _mix(*parts: int) -> int:
    # A fixed, order-sensitive mix of small integers into a 63-bit seed (no Python hash randomisation).
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def seed_all(seed: int) -> None:
    """Seed ``random``, NumPy and torch (all devices) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class EpochSampler(DistributedSampler):
    """Shuffled (or sequential) indices determined by ``(seed, epoch)``; re-seeds global RNGs per epoch.

    With ``num_replicas == 1`` it is an ordinary shuffling sampler. ``drop_last`` as in
    ``DistributedSampler`` (drop the tail that does not divide evenly across ranks).
    """

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        reseed_globals: bool = True,
    ) -> None:
        super().__init__(
            dataset,  # type: ignore[arg-type]
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )
        self.reseed_globals = reseed_globals

    def __iter__(self) -> Iterator[int]:
        # A generator: this body runs at the first next(), right before the first sample is loaded.
        if self.reseed_globals:
            seed_all(_mix(self.seed, self.epoch, self.rank))
        yield from super().__iter__()


class UnpaddedDistributedSampler(DistributedSampler):
    """Rank ``r`` of ``R`` takes samples ``r, r+R, r+2R, ...``: disjoint, complete, no padding, no shuffle."""

    def __init__(self, dataset: Sized, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)  # type: ignore[arg-type]
        self.num_samples = len(range(rank, len(dataset), num_replicas))
        self.total_size = len(dataset)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


def _loader_with_sampler(loader: DataLoader, sampler: DistributedSampler, drop_last: bool) -> DataLoader:
    """A copy of ``loader`` that draws indices from ``sampler`` (same batch size, workers, collate)."""
    kwargs = {
        "batch_size": loader.batch_size,
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "drop_last": drop_last,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "generator": loader.generator,
    }
    if loader.num_workers > 0:
        kwargs["persistent_workers"] = loader.persistent_workers
        kwargs["prefetch_factor"] = loader.prefetch_factor
        kwargs["multiprocessing_context"] = loader.multiprocessing_context
    return DataLoader(loader.dataset, sampler=sampler, **kwargs)


def _is_shuffled(loader: DataLoader) -> bool:
    sampler = loader.sampler
    if isinstance(sampler, DistributedSampler):
        return bool(sampler.shuffle)
    return isinstance(sampler, torch.utils.data.RandomSampler)


def train_loader(loader: DataLoader, seed: int, num_replicas: int = 1, rank: int = 0) -> DataLoader:
    """``loader`` re-built on an :class:`EpochSampler`; a loader that already has one is returned as is."""
    if not isinstance(loader, DataLoader) or isinstance(loader.sampler, EpochSampler):
        return loader
    if loader.batch_size is None:  # a custom batch_sampler: leave it to its owner
        return loader
    sampler = EpochSampler(
        loader.dataset,  # type: ignore[arg-type]
        num_replicas=num_replicas,
        rank=rank,
        shuffle=_is_shuffled(loader),
        seed=seed,
        drop_last=loader.drop_last and num_replicas > 1,
    )
    return _loader_with_sampler(loader, sampler, loader.drop_last)


def eval_loader(loader: DataLoader, num_replicas: int, rank: int) -> DataLoader:
    """``loader`` split across ranks without padding (unchanged with one process)."""
    if num_replicas <= 1 or not isinstance(loader, DataLoader) or loader.batch_size is None:
        return loader
    if isinstance(loader.sampler, UnpaddedDistributedSampler):
        return loader
    return _loader_with_sampler(loader, UnpaddedDistributedSampler(loader.dataset, num_replicas, rank), False)  # type: ignore[arg-type]
