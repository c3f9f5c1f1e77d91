"""Validation perplexity, computed collectively (each rank takes a share, sums are all-reduced)."""

from __future__ import annotations

import contextlib
import math
import random

import torch

from .distributed import DistContext, shard, sum_all


def batches_to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def perplexity(model, items: list, eval_collate, pad_id: int, batch_size: int, ctx: DistContext,
               max_samples: int, autocast=contextlib.nullcontext) -> float | None:
    """exp(mean token NLL) over max_samples validation items; None when there are none. The items
    are a seeded shuffle of the validation set, so with several datasets each is represented."""
    from .objectives.common import token_nll

    items = sample(items, max_samples)
    if not items:
        return None
    indices = shard(len(items), ctx.rank, ctx.world_size)
    was_training = model.training
    model.eval()
    nll_sum, token_count = 0.0, 0.0
    with torch.no_grad():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            batch = batches_to_device(eval_collate([items[i % len(items)] for i in chunk], pad_id), ctx.device)
            owned = torch.tensor([i < len(items) for i in chunk], device=ctx.device)
            batch["labels"] = torch.where(owned[:, None], batch["labels"], torch.full_like(batch["labels"], -100))
            with autocast():
                nll, count = token_nll(model, batch)
            nll_sum += float(nll)
            token_count += float(count)
    model.train(was_training)
    nll_sum, token_count = sum_all([nll_sum, token_count], ctx.device)
    if token_count == 0:
        return None
    return math.exp(min(nll_sum / token_count, 700.0))


def sample(items: list, max_samples: int, seed: int = 0) -> list:
    """max_samples items drawn without replacement in a fixed order (every rank and restart agrees)."""
    if len(items) <= max_samples:
        return list(items)
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in sorted(order[:max_samples])]
