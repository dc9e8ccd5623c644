"""Training batches grouped by length: little padding, still a fresh random order every epoch."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class LengthGroupedSampler(Sampler[int]):
    """Indices in an order whose consecutive runs of ``batch_size`` have similar lengths.

    Each epoch: a seeded random permutation, cut into windows of ``window`` batches; each window is
    sorted by length and cut into batches; the batches of all windows are shuffled. So every epoch sees
    new batch compositions and a random batch order, while a batch is padded only to lengths close to
    its own (the same scheme as ``transformers``' ``group_by_length``). Under data parallelism Lightning
    hands rank ``r`` every ``world``-th index, which keeps each rank's batches length-grouped too.

    Epoch ``e`` uses the generator seed ``seed + e``, so a run is reproducible from its seed alone.
    Lightning calls :meth:`set_epoch` on a single device; under its distributed wrapper, which does
    not pass the epoch on, each new iteration advances the epoch itself.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, window: int = 64, seed: int = 0) -> None:
        if batch_size < 1 or window < 1:
            raise ValueError(f"LengthGroupedSampler: batch_size ({batch_size}) and window ({window}) must be ≥ 1")
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        self.batch_size, self.window, self.seed, self.epoch = batch_size, window, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        order = torch.randperm(len(self.lengths), generator=generator)
        span = self.batch_size * self.window
        batches = []
        for start in range(0, len(order), span):
            chunk = order[start:start + span]
            # stable sort, longest first: the window's longest batch comes first within it
            chunk = chunk[torch.argsort(self.lengths[chunk], descending=True, stable=True)]
            batches += list(torch.split(chunk, self.batch_size))
        # The one short batch (the last) stays last, so all others keep batch_size examples.
        full = [b for b in batches if len(b) == self.batch_size]
        short = [b for b in batches if len(b) != self.batch_size]
        shuffled = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()] + short
        return iter(torch.cat(shuffled).tolist() if shuffled else [])


def padding_share(lengths: Sequence[int], order: Sequence[int], batch_size: int) -> float:
    """Fraction of the tokens in padded batches (``order`` cut into runs of ``batch_size``, each padded
    to its longest) that are padding."""
    lengths = torch.as_tensor(list(lengths), dtype=torch.long)[torch.as_tensor(list(order), dtype=torch.long)]
    real = padded = 0
    for batch in torch.split(lengths, batch_size):
        real += int(batch.sum())
        padded += int(batch.max()) * len(batch)
    return 1 - real / padded if padded else 0.0
