"""Packing: short sequences concatenated, in order, into sequences of at most max_length tokens.

A sequence is never split, so no example loses its beginning; the loss mask travels with it.
"""

from __future__ import annotations

from .tokenize import Sequence


def pack(sequences: list[Sequence], max_length: int) -> list[Sequence]:
    packed: list[Sequence] = []
    current = Sequence([], [])
    for sequence in sequences:
        if current.input_ids and len(current) + len(sequence) > max_length:
            packed.append(current)
            current = Sequence([], [])
        current = Sequence(current.input_ids + sequence.input_ids[:max_length],
                           current.loss_mask + sequence.loss_mask[:max_length])
    if current.input_ids:
        packed.append(current)
    return packed
