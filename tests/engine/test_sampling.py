from __future__ import annotations

import torch
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler

from ctseg.engine.sampling import (
    EpochSampler,
    UnpaddedDistributedSampler,
    eval_loader,
    step_seed,
    train_loader,
)


def test_unpadded_sampler_covers_each_sample_once():
    n, world = 7, 3
    shards = [list(UnpaddedDistributedSampler(range(n), world, r)) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    assert [len(UnpaddedDistributedSampler(range(n), world, r)) for r in range(world)] == [3, 2, 2]


def test_eval_loader_only_changes_with_several_processes():
    dl = DataLoader(list(range(5)), batch_size=2)
    assert eval_loader(dl, 1, 0) is dl
    split = eval_loader(dl, 2, 1)
    assert isinstance(split.sampler, UnpaddedDistributedSampler)
    assert [b.tolist() for b in split] == [[1, 3]]


def test_epoch_sampler_depends_only_on_seed_and_epoch():
    a, b = EpochSampler(range(20), seed=3), EpochSampler(range(20), seed=3)
    torch.manual_seed(0)
    a.set_epoch(2)
    first = list(a)
    torch.manual_seed(123)  # the global RNG does not matter
    b.set_epoch(2)
    assert list(b) == first
    b.set_epoch(3)
    assert list(b) != first


def test_train_loader_replaces_only_global_rng_samplers():
    data = list(range(10))
    shuffled = DataLoader(data, batch_size=2, sampler=RandomSampler(data), drop_last=True)
    out = train_loader(shuffled, seed=1)
    assert isinstance(out.sampler, EpochSampler) and out.drop_last and out.batch_size == 2
    seq = DataLoader(data, batch_size=2, sampler=SequentialSampler(data))
    assert train_loader(seq, seed=1) is seq


def test_step_seed_is_deterministic_and_distinct():
    assert step_seed(0, 5, 0) == step_seed(0, 5, 0)
    assert len({step_seed(0, s, r) for s in range(50) for r in range(2)}) == 100
