"""causal-lm: predict every token (plain language modelling; loss masks are ignored)."""

from __future__ import annotations

from functools import partial

from . import ObjectiveSpec, register
from .common import lm_collate, nll_sum_loss, target_count

collate = partial(lm_collate, every_token=True)

SPEC = register(ObjectiveSpec("causal-lm", collate, nll_sum_loss, eval_collate=collate, units=target_count))
