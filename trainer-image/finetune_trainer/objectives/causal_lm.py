"""causal-lm: predict every token (plain language modelling; loss masks are ignored)."""

from __future__ import annotations

from . import ObjectiveSpec, register
from .common import lm_collate, nll_sum_loss, padding_free_batch, target_count


def collate(items, pad_id: int) -> dict:
    if items and hasattr(items[0], "documents"):
        return padding_free_batch([(ids, [1] * len(ids)) for item in items for ids, _ in item.documents()])
    return lm_collate(items, pad_id, loss_masks=lambda rows: [[1] * len(r.input_ids) for r in rows])


SPEC = register(ObjectiveSpec("causal-lm", collate, nll_sum_loss, eval_collate=collate, units=target_count))
