"""sft: supervised fine-tuning; loss only on the completion (instruction) or assistant turns (chat)."""

from __future__ import annotations

from . import ObjectiveSpec, register
from .common import lm_collate, nll_sum_loss, target_count

SPEC = register(ObjectiveSpec("sft", lm_collate, nll_sum_loss, eval_collate=lm_collate, units=target_count))
