"""Length-grouped training batches: a permutation each epoch, little padding, reproducible by seed."""

import random

import pytest
from torch.utils.data import RandomSampler

from lightning_merge.data import GlueDataModule
from lightning_merge.data.buckets import LengthGroupedSampler, padding_share


def _lengths(n=1000, seed=0):
    rng = random.Random(seed)
    return [rng.randint(5, 128) for _ in range(n)]


def _padding_by_hand(lengths, order, batch_size):
    real = padded = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start:start + batch_size]]
        real += sum(batch)
        padded += max(batch) * len(batch)
    return 1 - real / padded


def test_each_epoch_is_a_permutation_with_full_batches_first():
    lengths = _lengths(1003)
    sampler = LengthGroupedSampler(lengths, batch_size=16, window=8, seed=1)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(1003))
        orders.append(order)
    assert orders[0] != orders[1] != orders[2]
    # the one short batch (1003 = 62·16 + 11) is the last; every other batch comes from one window,
    # sorted longest first
    for start in range(0, 62 * 16, 16):
        batch = [lengths[i] for i in orders[0][start:start + 16]]
        assert batch == sorted(batch, reverse=True)


def test_same_seed_same_order_and_distributed_iteration_advances_the_epoch():
    lengths = _lengths(200)
    a, b = LengthGroupedSampler(lengths, 8, seed=5), LengthGroupedSampler(lengths, 8, seed=5)
    assert list(a) == list(b)
    assert list(LengthGroupedSampler(lengths, 8, seed=5)) != list(LengthGroupedSampler(lengths, 8, seed=6))
    # without set_epoch (Lightning's distributed wrapper) the second pass is epoch 1's order
    epoch_one = LengthGroupedSampler(lengths, 8, seed=5)
    epoch_one.set_epoch(1)
    assert list(a) == list(epoch_one)


def test_batches_are_shuffled_between_groups_and_padding_drops():
    lengths = _lengths(4096)
    sampler = LengthGroupedSampler(lengths, batch_size=16, window=64, seed=0)
    order = list(sampler)
    maxima = [max(lengths[i] for i in order[s:s + 16]) for s in range(0, 4096, 16)]
    assert maxima != sorted(maxima) and maxima != sorted(maxima, reverse=True)
    plain = random.Random(0).sample(range(4096), 4096)
    grouped, shuffled = padding_share(lengths, order, 16), padding_share(lengths, plain, 16)
    assert grouped == pytest.approx(_padding_by_hand(lengths, order, 16))
    assert shuffled == pytest.approx(_padding_by_hand(lengths, plain, 16))
    assert grouped < 0.05 < 0.3 < shuffled


def test_glue_training_batches_are_length_grouped_by_default(glue_dir, tiny_bert):
    kwargs = dict(data_dir=str(glue_dir), tokenizer=str(tiny_bert), batch_size=4, seed=2)
    dm = GlueDataModule("rte", **kwargs)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, LengthGroupedSampler)
    lengths = [len(ids) for ids in dm.splits["train"]["input_ids"]]
    seen = []
    for batch in loader:
        real = batch["attention_mask"].sum(1).tolist()
        assert real == sorted(real, reverse=True)
        seen += real
    assert sorted(seen) == sorted(lengths)
    plain = GlueDataModule("rte", bucket_window=0, **kwargs)
    plain.setup("fit")
    assert isinstance(plain.train_dataloader().sampler, RandomSampler)
