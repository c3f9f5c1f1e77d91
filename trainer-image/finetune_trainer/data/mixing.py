"""Multi-task mixing: several datasets combined in proportion to their shares (weights, or
temperature-scaled sizes)."""

from __future__ import annotations

import math
import random
from typing import TypeVar

T = TypeVar("T")


def shares(sizes: list[int], weights: list[float], temperature: float | None = None) -> list[float]:
    """Each dataset's share of the training data, summing to 1. Without a temperature: in proportion to weight.
    With one: in proportion to weight x rows^(1/temperature), the temperature sampling of multilingual
    training (Arivazhagan et al. 2019, mT5): 1 follows the sizes, larger values flatten toward uniform so
    small tasks are not drowned out. Computed in log space: rows^(1/T) overflows a float for small T."""
    if temperature is None:
        total = sum(weights)
        return [w / total for w in weights]
    logs = [math.log(w) + math.log(max(n, 1)) / temperature for n, w in zip(sizes, weights)]
    top = max(logs)
    raw = [math.exp(x - top) for x in logs]
    total = sum(raw)
    return [r / total for r in raw]


def split(total: int, weights: list[float]) -> list[int]:
    """total split by weight, largest-remainder rounding, so the counts add up exactly."""
    weight_sum = sum(weights)
    exact = [total * w / weight_sum for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def mixture_counts(sizes: list[int], weights: list[float]) -> list[int]:
    """How many rows each dataset contributes: the mixture has as many rows as all datasets
    together, split by weight."""
    return split(sum(sizes), weights)


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
