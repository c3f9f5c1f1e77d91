"""The registry of training objectives: one small module each, registered by name.

An objective turns a list of tokenized items into a batch (collate) and a batch into a summed loss
with metrics (loss); `units` counts what the loss is normalised by (target tokens, pairs), which the
training loop sums over every micro-batch and rank of an optimizer step. Every objective can also
measure validation negative log-likelihood (for perplexity).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..errors import ConfigError


@dataclass(frozen=True)
class ObjectiveSpec:
    name: str
    collate: Callable[[list, int], dict]           # (items, pad_id) -> batch of tensors
    loss: Callable[..., Any]                       # (model, batch, hyperparameters) -> (summed loss, metric sums)
    eval_collate: Callable[[list, int], dict]      # (items, pad_id) -> batch for token_nll
    units: Callable[[dict], int]                   # batch -> how many units the summed loss covers
    # (model, batch) -> the two per-row log-probs the loss compares with a reference (chosen and rejected,
    # completion and mismatched completion); the stage's reference pass computes them with this, so the
    # reference and the policy see the same forwards. None: the loss needs no reference.
    reference_log_probs: Callable[[Any, dict], tuple] | None = None

    @property
    def needs_reference(self) -> bool:
        """Whether the loss needs reference log-probs in the batch (run.py computes them as the stage starts)."""
        return self.reference_log_probs is not None


OBJECTIVES: dict[str, ObjectiveSpec] = {}


def register(spec: ObjectiveSpec) -> ObjectiveSpec:
    OBJECTIVES[spec.name] = spec
    return spec


def get(name: str) -> ObjectiveSpec:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ConfigError(f"unknown objective {name!r}; known: {', '.join(sorted(OBJECTIVES))}") from None


from . import causal_lm, dpo, kto, sft  # noqa: E402,F401  (each registers itself)
