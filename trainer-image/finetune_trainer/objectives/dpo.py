"""dpo: direct preference optimisation against the model as it was when the stage started.

The reference log-probabilities are computed once per stage, before its first step (so no
second copy of the model is kept, whatever the method), and travel in the batch. Like TRL's
DPOTrainer the loss is a mean over pairs, dropout is off while the stage trains (dropout.py; a
later stage trains with the configured dropout again), and the reward metrics are reported:
rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins (beta times the log-ratio to
the reference).
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


def loss(model, batch: dict, hyperparameters) -> tuple[torch.Tensor, dict[str, float]]:
    """The summed sigmoid DPO loss over the batch's pairs, and the sums of TRL's reward metrics."""
    chosen, rejected = pair_log_probs(model, batch)
    reference = batch["reference_log_probs"].to(chosen.device)
    half = reference.shape[0] // 2
    beta = hyperparameters.dpoBeta
    valid = real_pairs(batch).to(chosen.device).float()
    chosen_rewards = beta * (chosen - reference[:half]).detach()
    rejected_rewards = beta * (rejected - reference[half:]).detach()
    margin = (chosen - reference[:half]) - (rejected - reference[half:])
    metrics = {"rewards/chosen": float((chosen_rewards * valid).sum()),
               "rewards/rejected": float((rejected_rewards * valid).sum()),
               "rewards/accuracies": float(((chosen_rewards > rejected_rewards).float() * valid).sum()),
               "rewards/margins": float(((chosen_rewards - rejected_rewards) * valid).sum())}
    return -(F.logsigmoid(beta * margin) * valid).sum(), metrics


def real_pairs(batch: dict) -> torch.Tensor:
    """Per pair: whether it has targets (a filler row that keeps the ranks in step has none)."""
    half = batch["labels"].shape[0] // 2
    return (batch["labels"][:half, 1:] != -100).any(-1)


def pairs(batch: dict) -> int:
    return int(real_pairs(batch).sum())


def eval_collate(items, pad_id: int) -> dict:
    """Validation perplexity of a preference set: the chosen answers given their prompts."""
    return _answer_batch(items, pad_id, "chosen_ids")


SPEC = register(ObjectiveSpec("dpo", collate, loss, eval_collate=eval_collate, units=pairs,
                              reference_log_probs=pair_log_probs))
