"""sft: supervised fine-tuning; loss only on the completion (instruction) or assistant turns (chat)."""

from __future__ import annotations

from . import ObjectiveSpec, register
from .common import language_model_batch, mean_nll_loss


def collate(items, pad_id: int) -> dict:
    return language_model_batch([i.input_ids for i in items], [i.loss_mask for i in items], pad_id)


SPEC = register(ObjectiveSpec("sft", collate, mean_nll_loss, eval_collate=collate))
