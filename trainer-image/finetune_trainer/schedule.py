"""Which items each rank trains on at each step: a pure function of (seed, epoch, step), so the
data position after a restart is simply the step number."""

from __future__ import annotations

import random


def steps_per_epoch(n_items: int, world_size: int, batch_size: int, accumulation: int) -> int:
    per_rank = -(-n_items // world_size)
    micro_batches = -(-per_rank // batch_size)
    return max(1, -(-micro_batches // accumulation))


def total_steps(n_items: int, world_size: int, hyperparameters) -> int:
    if hyperparameters.maxSteps:
        return hyperparameters.maxSteps
    per_epoch = steps_per_epoch(n_items, world_size, hyperparameters.batchSize, hyperparameters.gradientAccumulationSteps)
    return per_epoch * hyperparameters.epochs


def epoch_micro_batches(n_items: int, epoch: int, seed: int, rank: int, world_size: int, batch_size: int,
                        accumulation: int) -> list[list[int]]:
    """This rank's micro-batches of one epoch: steps_per_epoch * accumulation lists of item indices.
    The epoch's permutation is shared by all ranks; each rank takes every world_size-th item,
    cycling when the last micro-batches need more items than there are."""
    order = list(range(n_items))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    mine = order[rank::world_size] or order
    count = steps_per_epoch(n_items, world_size, batch_size, accumulation) * accumulation
    needed = count * batch_size
    cycled = [mine[i % len(mine)] for i in range(needed)]
    return [cycled[i * batch_size:(i + 1) * batch_size] for i in range(count)]
