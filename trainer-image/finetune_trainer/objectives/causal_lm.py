"""causal-lm: predict every token (plain language modelling; loss masks are ignored)."""

from __future__ import annotations

from . import ObjectiveSpec, register
from .common import language_model_batch, mean_nll_loss


def collate(items, pad_id: int) -> dict:
    return language_model_batch([i.input_ids for i in items], [[1] * len(i.input_ids) for i in items], pad_id)


SPEC = register(ObjectiveSpec("causal-lm", collate, mean_nll_loss, eval_collate=collate))
