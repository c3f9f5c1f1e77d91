"""Packing: documents placed best-fit-decreasing into rows of at most max_length tokens.

A document is never split, so none loses its beginning, and each keeps its own positions and loss
mask: the objectives lay a row's documents end to end without padding, with position_ids restarting
per document, so attention never crosses documents (see objectives/common.py). Validation is never
packed. Best-fit decreasing, as TRL's default "bfd" strategy, fills rows far better than packing in
arrival order.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from .tokenize import Sequence


@dataclass
class PackedRow:
    sequences: list[Sequence] = field(default_factory=list)

    def __len__(self) -> int:
        return sum(len(s) for s in self.sequences)

    def documents(self) -> list[tuple[list[int], list[int]]]:
        return [(s.input_ids, s.loss_mask) for s in self.sequences]


def pack(sequences: list[Sequence], max_length: int) -> list[PackedRow]:
    """Rows of documents, each row at most max_length tokens (a longer document gets a row to itself,
    cut to max_length). Deterministic: ties keep the input order."""
    rows: list[PackedRow] = []
    free: list[tuple[int, int]] = []  # (free space, row index), sorted
    for index in sorted(range(len(sequences)), key=lambda i: -len(sequences[i])):
        sequence = sequences[index]
        if len(sequence) > max_length:
            sequence = Sequence(sequence.input_ids[:max_length], sequence.loss_mask[:max_length])
        position = bisect.bisect_left(free, (len(sequence), -1))
        if position < len(free):
            space, row = free.pop(position)
        else:
            space, row = max_length, len(rows)
            rows.append(PackedRow())
        rows[row].sequences.append(sequence)
        if space - len(sequence) > 0:
            bisect.insort(free, (space - len(sequence), row))
    return rows
