"""Multi-task mixing: several datasets combined in proportion to their weights."""

from __future__ import annotations

import random
from typing import TypeVar

T = TypeVar("T")


def mixture_counts(sizes: list[int], weights: list[float]) -> list[int]:
    """How many rows each dataset contributes: the mixture has as many rows as all datasets
    together, split by weight (largest-remainder rounding, so the counts add up exactly)."""
    total = sum(sizes)
    weight_sum = sum(weights)
    exact = [total * w / weight_sum for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def take(rows: list[T], count: int, rng: random.Random) -> list[T]:
    """count rows from rows: a shuffled subset when fewer are needed, whole repeats plus a subset when more."""
    if not rows:
        return []
    repeats, remainder = divmod(count, len(rows))
    return rows * repeats + rng.sample(rows, remainder)


def down_samples(sizes: list[int], weights: list[float]) -> bool:
    """Whether some dataset contributes fewer rows than it has."""
    return len(sizes) > 1 and any(c < n for c, n in zip(mixture_counts(sizes, weights), sizes))


def mix(datasets: list[list[T]], weights: list[float], seed: int, epoch: int = 0) -> list[T]:
    """The mixture of one epoch: the subsets of down-sampled datasets are drawn afresh per epoch."""
    if len(datasets) == 1:
        return list(datasets[0])
    rng = random.Random(seed if epoch == 0 else f"{seed}/{epoch}")
    counts = mixture_counts([len(d) for d in datasets], weights)
    mixed = [row for rows, count in zip(datasets, counts) for row in take(rows, count, rng)]
    rng.shuffle(mixed)
    return mixed
