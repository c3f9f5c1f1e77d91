"""Layer-wise learning-rate decay (ULMFiT's discriminative fine-tuning, as in BERT/ELECTRA fine-tuning):
layers nearer the output move more than the foundation layers.

Block i of L trains at learningRate * decay^(L-1-i), the input embeddings at learningRate * decay^L, the
head side (final norm, output head, and input embeddings tied to the head, which are the head) at
learningRate. The factors scale each param group's learning rate; the schedule (warm-up, cosine) scales
every group alike.
"""

from __future__ import annotations

from .unfreezing import EMBEDDINGS


def scale(depth: int, blocks: int, decay: float) -> float:
    if depth == EMBEDDINGS:
        return decay ** blocks
    return decay ** max(blocks - 1 - depth, 0)


def lr_scales(depths: dict[str, int], blocks: int, decay: float) -> dict[str, float]:
    return {name: scale(depth, blocks, decay) for name, depth in depths.items()}
