"""Samplers and seeding that make training resumable bit-for-bit and distributed evaluation exact.

* Model-side randomness (CT sampling, dropout, drop-path) is re-seeded before every optimizer step
  from ``(seed, global_step, rank)`` (:func:`step_seed`), so it does not depend on how the RNG state
  was reached: a run killed after an epoch and resumed from its checkpoint draws the same CT samples
  as an uninterrupted one. Lightning does not checkpoint RNG states, and it creates the loader
  iterator at different points for a fresh epoch and for the first epoch after a resume, so seeding
  "per epoch" from a hook is not enough.
* Data-side randomness belongs to the training sampler: the datamodule's sampler gives each sample
  its own seed from ``(seed, epoch)``; a loader with a plain ``RandomSampler`` (global RNG) is
  re-built on an :class:`EpochSampler` (order from ``(seed, epoch)`` only).
* :class:`UnpaddedDistributedSampler` (validation / test): each rank gets a disjoint share of the
  samples and none is duplicated (``DistributedSampler`` pads to a multiple of the world size, which
  counts the padded samples twice in the confusion matrix).

Both samplers subclass ``DistributedSampler`` so that Lightning leaves them in place.
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


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """Seed of optimizer step ``step`` on process ``rank`` of a run seeded with ``seed``."""
    return _mix(seed, step, rank)


class EpochSampler(DistributedSampler):
    """Shuffled (or sequential) indices determined by ``(seed, epoch)`` only; Lightning calls ``set_epoch``.

    With ``num_replicas == 1`` it is an ordinary shuffling sampler; ``drop_last`` as in
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
    ) -> None:
        super().__init__(
            dataset,  # type: ignore[arg-type]
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )


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


def train_loader(loader: DataLoader, seed: int, num_replicas: int = 1, rank: int = 0) -> DataLoader:
    """A loader drawing from a global-RNG ``RandomSampler`` re-built on an :class:`EpochSampler`."""
    if not isinstance(loader, DataLoader) or loader.batch_size is None:
        return loader  # custom batch samplers are left to their owner
    if not isinstance(loader.sampler, torch.utils.data.RandomSampler):
        return loader  # sequential, or a sampler that seeds itself per epoch (set_epoch)
    sampler = EpochSampler(
        loader.dataset,  # type: ignore[arg-type]
        num_replicas=num_replicas,
        rank=rank,
        shuffle=True,
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
