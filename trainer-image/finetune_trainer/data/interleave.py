"""Interleaved multi-task (preprocessing.multiTask.strategy interleave): each micro-batch comes from one dataset.

An epoch has as many micro-batches as mixing would give (from all the datasets' items together). They
are split among the datasets by share (largest remainder, so the proportions hold exactly per epoch) and
put in a seeded random order: the datasets take turns in proportion to their shares. Every rank trains
on the same dataset at the same micro-batch, so a step's per-dataset losses need one all-reduce and a
step's micro-batches differ only in which rows of that dataset each rank holds.

Each dataset serves its micro-batches from its own stream: its items in a fresh seeded permutation per
pass, so a dataset drawn more often than it has rows repeats whole passes, and one drawn less gets a
different subset every epoch. A dataset with fewer items than a global micro-batch (batchSize x ranks)
gives each of its micro-batches every item once, the ranks' remaining slots padding (no row appears
twice in one micro-batch). Everything is a pure function of (seed, epoch, rank): the data position
after a restart is the step number, as with mixing.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from itertools import accumulate

from .. import schedule
from . import mixing


@dataclass(frozen=True)
class MicroBatch:
    source: int          # index of the dataset (in the stage's datasets)
    indices: list[int]   # into the epoch's items (every dataset's items, concatenated); >= their count: padding


def source_order(counts: list[int], seed: int, epoch: int) -> list[int]:
    """The dataset of each micro-batch of an epoch: dataset i counts[i] times, in a seeded order."""
    order = [source for source, count in enumerate(counts) for _ in range(count)]
    random.Random(f"interleave/{seed}/{epoch}").shuffle(order)
    return order


def stream(size: int, needed: int, seed: int, epoch: int, source: int) -> list[int]:
    """needed item positions of one dataset: seeded permutations of range(size), one pass after another."""
    out: list[int] = []
    passes = 0
    while len(out) < needed:
        permutation = list(range(size))
        random.Random(f"interleave/{seed}/{epoch}/{source}/{passes}").shuffle(permutation)
        out += permutation
        passes += 1
    return out[:needed]


def epoch_micro_batches(sizes: list[int], shares: list[float], epoch: int, seed: int, rank: int, world_size: int,
                        batch_size: int, accumulation: int) -> list[MicroBatch]:
    """This rank's micro-batches of one epoch: steps_per_epoch x accumulation of them, each of one dataset.
    sizes: the items of each dataset, in the order they are concatenated in the epoch's items."""
    n_items = sum(sizes)
    count = schedule.steps_per_epoch(n_items, world_size, batch_size, accumulation) * accumulation
    counts = mixing.split(count, shares)
    offsets = [0, *accumulate(sizes)]
    per_batch = [min(batch_size * world_size, size) for size in sizes]
    streams = [stream(size, c * m, seed, epoch, source)
               for source, (size, c, m) in enumerate(zip(sizes, counts, per_batch))]
    served = [0] * len(sizes)
    out = []
    for source in source_order(counts, seed, epoch):
        m = per_batch[source]
        chunk = streams[source][served[source] * m:(served[source] + 1) * m]
        served[source] += 1
        mine = [offsets[source] + i for i in chunk[rank::world_size]]
        out.append(MicroBatch(source, mine + list(range(n_items, n_items + batch_size - len(mine)))))
    return out
