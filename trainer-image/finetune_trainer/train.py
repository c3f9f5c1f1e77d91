"""The training loop of one stage, and the per-stage preparation some objectives need."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import distributed, schedule
from .data import interleave
from .evaluation import batches_to_device
from .objectives.common import IGNORE, real_tokens


@dataclass
class StepReport:
    step: int            # optimizer steps done in this stage
    loss: float          # mean over every unit (target token, pair) of all micro-batches and ranks
    tokens: int          # real (non-pad) input tokens processed by all ranks in this step
    learning_rate: float
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)  # the objective's own, averaged like the loss
    # Interleaved multi-task: the dataset of each micro-batch, and each of those datasets' mean loss over its
    # own units in this step (all ranks). Empty when the datasets are mixed.
    sources: list[int] = field(default_factory=list)
    dataset_losses: dict[int, float] = field(default_factory=dict)


@dataclass
class LoopResult:
    losses: list[float] = field(default_factory=list)
    stopped_at: int | None = None  # set when a stop was requested (preemption)


def move(batch: dict, device) -> dict:
    return batches_to_device(batch, device)


def attach_reference_log_probs(model, items, collate, log_probs_fn, pad_id: int, batch_size: int, ctx,
                               autocast=contextlib.nullcontext) -> None:
    """DPO: the reference's log-probs of chosen and rejected answers, computed once as the stage
    starts (sharded over ranks, then summed) under the same autocast as training, stored on the items."""
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
            with autocast():
                chosen, rejected = log_probs_fn(model, batch)
            for j, i in enumerate(chunk):
                if i < n:
                    values[i, 0], values[i, 1] = float(chosen[j]), float(rejected[j])
    model.train(was_training)
    summed = distributed.sum_all(values.flatten().tolist(), ctx.device)
    for i, item in enumerate(items):
        item.reference = (summed[2 * i], summed[2 * i + 1])


def micro_batch(objective, items, indices: list[int], pad_id: int) -> dict:
    """The items of a micro-batch; padding indices (past the end of the epoch) are left out. A rank
    whose micro-batch is all padding runs one row with no targets, so the ranks stay in step."""
    real = [items[i] for i in indices if i < len(items)]
    if real:
        return objective.collate(real, pad_id)
    batch = objective.collate([items[indices[0] % len(items)]], pad_id)
    batch["labels"] = torch.full_like(batch["labels"], IGNORE)
    return batch


def run_loop(engine, objective, data, hyperparameters, ctx, pad_id: int, start_step: int, total_steps: int,
             seed: int, stop_requested: Callable[[], bool], after_step: Callable[[StepReport], None],
             before_step: Callable[[int], None] | None = None) -> LoopResult:
    """Optimizer steps start_step+1 .. total_steps.

    Every unit of a step (target token, preference pair) weighs the same, wherever it is: before the
    first backward of a step the ranks all-reduce how many units the step's micro-batches hold, and
    each micro-batch's summed loss is divided by that count (times world_size, since DDP and DeepSpeed
    average gradients over ranks). So the step's gradient is that of one big batch of the same units,
    as in the Hugging Face Trainer since transformers 4.46. A second all-reduce per step sums the
    loss, the objective's metrics and the stop flag, so every rank stops at the same step.

    Interleaved multi-task (data.interleave) changes only where a micro-batch's items come from (one
    dataset each, interleave.py), not this normalisation; the per-dataset losses ride on the second
    all-reduce (every rank has the same dataset at the same micro-batch).

    data is the list of training items, or anything with `train` (the first epoch's) and `epoch(e)`."""
    accumulation, batch_size = hyperparameters.gradientAccumulationSteps, hyperparameters.batchSize
    epoch_items = data.epoch if hasattr(data, "epoch") else (lambda _: data)
    planned = len(data.train) if hasattr(data, "train") else len(data)
    per_epoch = schedule.steps_per_epoch(planned, ctx.world_size, batch_size, accumulation)
    result = LoopResult()
    epoch_batches: dict[int, list[list[int]]] = {}
    epoch_sources: list[int] = []
    interleaved = getattr(data, "interleave", False)
    engine.model.train()
    step = start_step
    while step < total_steps:
        started = time.perf_counter()
        if before_step is not None:  # at a step boundary: method full's gradual unfreezing
            before_step(step)
        epoch, in_epoch = divmod(step, per_epoch)
        if epoch not in epoch_batches:
            items = epoch_items(epoch)
            if interleaved:
                planned_batches = interleave.epoch_micro_batches(data.source_sizes, data.weights, epoch, seed,
                                                                 ctx.rank, ctx.world_size, batch_size, accumulation)
                epoch_batches = {epoch: [b.indices for b in planned_batches]}
                epoch_sources = [b.source for b in planned_batches]
            else:
                epoch_batches = {epoch: schedule.epoch_micro_batches(len(items), epoch, seed, ctx.rank,
                                                                     ctx.world_size, batch_size, accumulation, planned)}
        slots = range(in_epoch * accumulation, (in_epoch + 1) * accumulation)
        batches = [micro_batch(objective, items, epoch_batches[epoch][slot], pad_id) for slot in slots]
        step_sources = [epoch_sources[slot] for slot in slots] if interleaved else []
        batch_units = [objective.units(b) for b in batches]
        units = distributed.sum_all([float(sum(batch_units))], ctx.device)[0]
        scale = ctx.world_size / max(units, 1.0)
        loss_sum, tokens, metric_sums = 0.0, 0, {}
        stepped = sorted(set(step_sources))
        source_loss, source_units = dict.fromkeys(stepped, 0.0), dict.fromkeys(stepped, 0.0)
        for k, batch in enumerate(batches):
            tokens += real_tokens(batch)
            batch = move(batch, ctx.device)
            boundary = k == accumulation - 1
            with engine.accumulating(boundary), engine.autocast():
                loss, metrics = objective.loss(engine.model, batch, hyperparameters)
            engine.backward(loss * scale)
            engine.after_backward(boundary)
            loss_sum += float(loss.detach())
            if interleaved:
                source_loss[step_sources[k]] += float(loss.detach())
                source_units[step_sources[k]] += float(batch_units[k])
            for name, value in metrics.items():
                metric_sums[name] = metric_sums.get(name, 0.0) + value
        step += 1
        names = sorted(metric_sums)
        totals = distributed.sum_all([loss_sum, float(tokens), 1.0 if stop_requested() else 0.0,
                                      *(metric_sums[n] for n in names), *(source_loss[s] for s in stepped),
                                      *(source_units[s] for s in stepped)], ctx.device)
        mean_loss = totals[0] / max(units, 1.0)
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"training loss is {mean_loss} at step {step}")
        result.losses.append(mean_loss)
        metrics = {n: v / max(units, 1.0) for n, v in zip(names, totals[3:3 + len(names)])}
        per_source = totals[3 + len(names):]
        summed_loss, summed_units = per_source[:len(stepped)], per_source[len(stepped):]
        dataset_losses = {s: l / u for s, l, u in zip(stepped, summed_loss, summed_units) if u > 0}
        after_step(StepReport(step, mean_loss, int(totals[1]), engine.learning_rate(), time.perf_counter() - started,
                              metrics, step_sources, dataset_losses))
        if totals[2] > 0:
            result.stopped_at = step
            break
    return result
