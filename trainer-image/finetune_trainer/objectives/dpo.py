"""dpo: direct preference optimisation against the model as it was when the stage started.

The reference log-probabilities are computed once per stage, before its first step (so no
second copy of the model is kept, whatever the method), and travel in the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import ObjectiveSpec, register
from .common import language_model_batch, sequence_log_probs


def _answer_batch(items, pad_id: int, answer: str) -> dict:
    input_ids, masks = [], []
    for item in items:
        ids = getattr(item, answer)
        input_ids.append(item.prompt_ids + ids)
        masks.append([0] * len(item.prompt_ids) + [1] * len(ids))
    return language_model_batch(input_ids, masks, pad_id)


def collate(items, pad_id: int) -> dict:
    """Chosen rows first, then rejected rows, in one batch (one forward pass)."""
    chosen, rejected = _answer_batch(items, pad_id, "chosen_ids"), _answer_batch(items, pad_id, "rejected_ids")
    width = max(chosen["input_ids"].shape[1], rejected["input_ids"].shape[1])

    def widen(t, value):
        return F.pad(t, (0, width - t.shape[1]), value=value)

    batch = {key: torch.cat([widen(chosen[key], v), widen(rejected[key], v)])
             for key, v in (("input_ids", pad_id), ("attention_mask", 0), ("labels", -100))}
    references = [getattr(i, "reference", None) for i in items]
    if all(r is not None for r in references):
        batch["reference_log_probs"] = torch.tensor([r[0] for r in references] + [r[1] for r in references])
    return batch


def pair_log_probs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    log_probs = sequence_log_probs(model, batch)
    half = log_probs.shape[0] // 2
    return log_probs[:half], log_probs[half:]


def loss(model, batch: dict, hyperparameters) -> torch.Tensor:
    chosen, rejected = pair_log_probs(model, batch)
    reference = batch["reference_log_probs"].to(chosen.device)
    half = reference.shape[0] // 2
    margin = (chosen - reference[:half]) - (rejected - reference[half:])
    return -F.logsigmoid(hyperparameters.dpoBeta * margin).mean()


def eval_collate(items, pad_id: int) -> dict:
    """Validation perplexity of a preference set: the chosen answers given their prompts."""
    return _answer_batch(items, pad_id, "chosen_ids")


SPEC = register(ObjectiveSpec("dpo", collate, loss, eval_collate=eval_collate, needs_reference=True))
