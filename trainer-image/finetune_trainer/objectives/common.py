"""Batching and token log-likelihoods shared by the objectives."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def language_model_batch(input_ids: list[list[int]], label_masks: list[list[int]], pad_id: int) -> dict:
    """Right-padded input_ids, attention_mask and labels (IGNORE where the mask is 0 or padding)."""
    labels = [[t if m else IGNORE for t, m in zip(ids, mask)] for ids, mask in zip(input_ids, label_masks)]
    return {
        "input_ids": pad(input_ids, pad_id),
        "attention_mask": pad([[1] * len(r) for r in input_ids], 0),
        "labels": pad(labels, IGNORE),
    }


def next_token_logits(model, batch: dict) -> torch.Tensor:
    output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    # Prompt tuning prepends virtual tokens to the outputs: keep the positions of the real tokens.
    return output.logits[:, -batch["input_ids"].shape[1]:, :]


def token_nll(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of negative log-likelihoods, number of predicted tokens) over the labelled tokens."""
    logits = next_token_logits(model, batch)[:, :-1, :].float()
    labels = batch["labels"][:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return nll, (labels != IGNORE).sum()


def sequence_log_probs(model, batch: dict) -> torch.Tensor:
    """Per row: the sum of log-probabilities of the labelled tokens."""
    logits = next_token_logits(model, batch)[:, :-1, :].float()
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    log_probs = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (log_probs * mask).sum(-1)


def mean_nll_loss(model, batch: dict, hyperparameters=None) -> torch.Tensor:
    nll, count = token_nll(model, batch)
    return nll / count.clamp(min=1)
