"""The training loop of one stage, and the per-stage preparation some objectives need."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import distributed, schedule
from .evaluation import batches_to_device


@dataclass
class StepReport:
    step: int            # optimizer steps done in this stage
    loss: float          # mean over micro-batches and ranks
    tokens: int          # tokens processed by all ranks in this step
    learning_rate: float
    seconds: float


@dataclass
class LoopResult:
    losses: list[float] = field(default_factory=list)
    stopped_at: int | None = None  # set when a stop was requested (preemption)


def move(batch: dict, device) -> dict:
    return batches_to_device(batch, device)


def attach_reference_log_probs(model, items, collate, log_probs_fn, pad_id: int, batch_size: int, ctx) -> None:
    """DPO: the policy's log-probs of chosen and rejected answers as the stage starts, computed once
    (sharded over ranks, then summed) and stored on the items."""
    n = len(items)
    indices = distributed.shard(n, ctx.rank, ctx.world_size)
    values = torch.zeros(n, 2, dtype=torch.float64)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            batch = move(collate([items[i % n] for i in chunk], pad_id), ctx.device)
            batch.pop("reference_log_probs", None)
            chosen, rejected = log_probs_fn(model, batch)
            for j, i in enumerate(chunk):
                if i < n:
                    values[i, 0], values[i, 1] = float(chosen[j]), float(rejected[j])
    model.train(was_training)
    summed = distributed.sum_all(values.flatten().tolist(), ctx.device)
    for i, item in enumerate(items):
        item.reference = (summed[2 * i], summed[2 * i + 1])


def run_loop(engine, objective, items, hyperparameters, ctx, pad_id: int, start_step: int, total_steps: int,
             seed: int, stop_requested: Callable[[], bool], after_step: Callable[[StepReport], None]) -> LoopResult:
    """Optimizer steps start_step+1 .. total_steps. Each step ends with one all-reduce that averages
    the loss and agrees on stopping, so every rank stops at the same step."""
    accumulation, batch_size = hyperparameters.gradientAccumulationSteps, hyperparameters.batchSize
    per_epoch = schedule.steps_per_epoch(len(items), ctx.world_size, batch_size, accumulation)
    result = LoopResult()
    epoch_batches: dict[int, list[list[int]]] = {}
    engine.model.train()
    step = start_step
    while step < total_steps:
        started = time.perf_counter()
        epoch, in_epoch = divmod(step, per_epoch)
        if epoch not in epoch_batches:
            epoch_batches = {epoch: schedule.epoch_micro_batches(len(items), epoch, seed, ctx.rank, ctx.world_size,
                                                                 batch_size, accumulation)}
        loss_sum, tokens = 0.0, 0
        for k in range(accumulation):
            indices = epoch_batches[epoch][in_epoch * accumulation + k]
            batch = move(objective.collate([items[i] for i in indices], pad_id), ctx.device)
            boundary = k == accumulation - 1
            with engine.accumulating(boundary), engine.autocast():
                loss = objective.loss(engine.model, batch, hyperparameters)
            engine.backward(loss)
            engine.after_backward(boundary)
            loss_sum += float(loss.detach())
            tokens += int(batch["attention_mask"].sum())
        step += 1
        loss_total, micro_total, tokens_total, stop = distributed.sum_all(
            [loss_sum, float(accumulation), float(tokens), 1.0 if stop_requested() else 0.0], ctx.device)
        mean_loss = loss_total / micro_total
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"training loss is {mean_loss} at step {step}")
        result.losses.append(mean_loss)
        after_step(StepReport(step, mean_loss, int(tokens_total), engine.learning_rate(), time.perf_counter() - started))
        if stop > 0:
            result.stopped_at = step
            break
    return result
