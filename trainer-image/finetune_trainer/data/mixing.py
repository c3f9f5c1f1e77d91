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


def mix(datasets: list[list[T]], weights: list[float], seed: int) -> list[T]:
    if len(datasets) == 1:
        return list(datasets[0])
    rng = random.Random(seed)
    counts = mixture_counts([len(d) for d in datasets], weights)
    mixed = [row for rows, count in zip(datasets, counts) for row in take(rows, count, rng)]
    rng.shuffle(mixed)
    return mixed
