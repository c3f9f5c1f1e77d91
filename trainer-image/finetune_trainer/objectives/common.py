"""Batching and token log-likelihoods shared by the objectives.

Two batch shapes:
- padded: right-padded rows with an attention_mask (one document per row);
- padding-free (packed rows): one row per packed row, its documents laid end to end, each with its own
  position_ids, and no attention_mask; the shorter rows end in padding that is a segment of its own
  (positions from 0, no targets). transformers builds a block-diagonal causal mask per row from the
  position_ids (SDPA, eager), so no document attends to another, and attention costs the square of a
  row (at most maxSeqLength), not of the whole micro-batch laid in one row (docs/benchmarks.md: 1.4x
  faster on CPU). Varlen flash-attention reads packed documents from position_ids only in a batch of
  one row, so for it the rows are laid end to end in one row at the model call (`model_inputs`): it
  computes only the documents' own blocks anyway. The first token of each document is never a target
  (it would be predicted from the previous document's end).

Losses are sums with a count of the units they are normalised by (target tokens, pairs), so that
the training loop can weight every unit of an optimizer step equally across micro-batches and ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def masked_labels(input_ids: list[int], loss_mask: list[int]) -> list[int]:
    return [t if m else IGNORE for t, m in zip(input_ids, loss_mask)]


def language_model_batch(input_ids: list[list[int]], label_masks: list[list[int]], pad_id: int) -> dict:
    """Right-padded input_ids, attention_mask and labels (IGNORE where the mask is 0 or padding)."""
    labels = [masked_labels(ids, mask) for ids, mask in zip(input_ids, label_masks)]
    return {
        "input_ids": pad(input_ids, pad_id),
        "attention_mask": pad([[1] * len(r) for r in input_ids], 0),
        "labels": pad(labels, IGNORE),
    }


def padding_free_batch(rows: list[list[tuple[list[int], list[int]]]], pad_id: int) -> dict:
    """Rows of (input_ids, loss_mask) documents: one row each, documents end to end with positions restarting
    per document, the shorter rows padded at the end with a segment of their own (positions from 0, no
    targets); real_tokens: the tokens that are not padding."""
    width = max(sum(len(ids) for ids, _ in row) for row in rows)
    input_ids, labels, positions, real = [], [], [], 0
    for row in rows:
        row_ids, row_labels, row_positions = [], [], []
        for ids, mask in row:
            document_labels = masked_labels(ids, mask)
            if document_labels:
                document_labels[0] = IGNORE
            row_ids += ids
            row_labels += document_labels
            row_positions += range(len(ids))
        real += len(row_ids)
        padding = width - len(row_ids)
        input_ids.append(row_ids + [pad_id] * padding)
        labels.append(row_labels + [IGNORE] * padding)
        positions.append(row_positions + list(range(padding)))
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "position_ids": torch.tensor(positions, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "real_tokens": torch.tensor(real),
    }


def documents_of(item) -> list[tuple[list[int], list[int]]]:
    """A packed row's documents, or the item itself as one document."""
    return item.documents() if hasattr(item, "documents") else [(item.input_ids, item.loss_mask)]


def real_tokens(batch: dict) -> int:
    """Input tokens that are not padding."""
    if "real_tokens" in batch:
        return int(batch["real_tokens"])
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


def flash_attention(model) -> bool:
    """Whether the model (under any wrapper: DDP, DeepSpeed, PEFT) runs varlen flash-attention."""
    inner = getattr(model, "module", model)
    return "flash" in str(getattr(getattr(inner, "config", None), "_attn_implementation", "") or "")


def model_inputs(model, batch: dict) -> dict:
    """The keyword arguments of the model's forward for a batch. Packed rows (position_ids, no attention_mask)
    go in as they are for SDPA and eager, laid end to end in one row for flash-attention."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    if "position_ids" in inputs:
        # transformers builds the block-diagonal mask from position_ids only without a KV cache; a
        # cache (the default even in training) would let packed documents attend to each other.
        inputs["use_cache"] = False
        if inputs["input_ids"].shape[0] > 1 and flash_attention(model):
            inputs["input_ids"] = inputs["input_ids"].reshape(1, -1)
            inputs["position_ids"] = inputs["position_ids"].reshape(1, -1)
    return inputs


def next_token_logits(model, batch: dict) -> torch.Tensor:
    rows, width = batch["input_ids"].shape
    logits = model(**model_inputs(model, batch)).logits
    if logits.shape[0] != rows:  # packed rows laid in one row for flash-attention
        return logits.reshape(rows, width, -1)
    # Prompt tuning prepends virtual tokens to the outputs: keep the positions of the real tokens.
    return logits[:, -width:, :]


def target_count(batch: dict) -> int:
    """The number of predicted (labelled) tokens in a batch: the unit the language-model loss is normalised by."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


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


def nll_sum_loss(model, batch: dict, hyperparameters=None) -> tuple[torch.Tensor, dict[str, float]]:
    """The summed token NLL (normalised by the loop over the whole optimizer step) and no extra metrics."""
    nll, _ = token_nll(model, batch)
    return nll, {}


def lm_collate(items, pad_id: int, every_token: bool = False) -> dict:
    """Padding-free when the items are packed rows, padded otherwise; every_token: targets are every
    token, not the loss mask's."""
    rows = [[(ids, [1] * len(ids) if every_token else mask) for ids, mask in documents_of(item)] for item in items]
    if items and hasattr(items[0], "documents"):
        return padding_free_batch(rows, pad_id)
    documents = [document for row in rows for document in row]
    return language_model_batch([ids for ids, _ in documents], [mask for _, mask in documents], pad_id)
