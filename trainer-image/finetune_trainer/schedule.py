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
                        accumulation: int, planned_items: int | None = None) -> list[list[int]]:
    """This rank's micro-batches of one epoch: steps_per_epoch * accumulation lists of item indices.
    The epoch's permutation is shared by all ranks; each rank takes every world_size-th item. Where the
    epoch's last step needs more items than there are, the lists are filled up with padding indices
    (>= n_items): the loop skips them, so every row is seen exactly once per epoch and weighs what any
    other row weighs, while every rank still runs the same number of micro-batches. planned_items (the
    first epoch's count, when a later epoch's mixture packs into a few more or fewer rows) fixes the
    number of steps; items beyond the planned slots wait for the next epoch's draw."""
    order = list(range(n_items))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    mine = order[rank::world_size]
    count = steps_per_epoch(planned_items or n_items, world_size, batch_size, accumulation) * accumulation
    needed = count * batch_size
    mine = mine[:needed]
    filled = mine + list(range(n_items, n_items + needed - len(mine)))
    return [filled[i * batch_size:(i + 1) * batch_size] for i in range(count)]
