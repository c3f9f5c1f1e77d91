"""evaluation.tasks and evaluation.general: what the model answers and how much it forgot.

The base model is measured before the first training step (so a full fine-tune needs no second copy of the
weights), its answers and general perplexity carried in the checkpoints' trainer state so that a resumed run
compares with the same baseline; the tuned model is measured after the last step. Every rank generates its
share of the answers (generation.generate); rank 0 scores them (scoring), applies the gates and writes the
report (report.render) next to evaluation.json.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

from . import config as cfg
from . import evaluation, objectives
from .data.pipeline import SourceReport, read_examples
from .data.tokenize import encode_text, truncate
from .distributed import DistContext
from .errors import DataError
from .generation import EvalPrompt, generate, load_prompts
from .scoring import gates as scoring_gates
from .scoring.checks import Check
from .scoring.task import TaskScores, score_task


@dataclass
class Inputs:
    """The prompts of each task and the tokenized general-domain rows, read once before training."""

    prompts: dict[str, list[EvalPrompt]] = field(default_factory=dict)
    general: list = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.prompts and not self.general


@dataclass
class Measurement:
    """One model's answers per task and its general-domain perplexity."""

    answers: dict[str, list[str]] = field(default_factory=dict)
    generalPerplexity: float | None = None

    def to_state(self) -> dict[str, Any]:
        return {"answers": self.answers, "generalPerplexity": self.generalPerplexity}

    @classmethod
    def from_state(cls, state: dict | None) -> "Measurement | None":
        if not state:
            return None
        return cls(answers={k: list(v) for k, v in (state.get("answers") or {}).items()},
                   generalPerplexity=state.get("generalPerplexity"))


def load_inputs(storage, settings: cfg.Evaluation, tokenizer, max_seq_length: int, seed: int) -> Inputs:
    prompts = {task.name: load_prompts(storage, task.uri, task.format, task.maxSamples, seed, tokenizer=tokenizer)
               for task in settings.tasks}
    general = []
    if settings.general is not None:
        report = SourceReport(uri=settings.general.uri, format="text", weight=1.0)
        for example in read_examples(storage, settings.general.uri, "text", report):
            item, _ = truncate(encode_text(tokenizer, example.text), max_seq_length)
            if len(item) >= 2:
                general.append(item)
        if not general:
            raise DataError(f"{settings.general.uri}: no text rows for evaluation.general")
    return Inputs(prompts, general)


def measure(module, tokenizer, inputs: Inputs, settings: cfg.Evaluation, ctx: DistContext, batch_size: int,
            autocast=contextlib.nullcontext, answers: bool = True) -> Measurement:
    """Collective: every rank calls it. answers False measures only the general perplexity."""
    out = Measurement()
    if answers:
        for task in settings.tasks:
            out.answers[task.name] = generate(module, tokenizer, [p.prompt_text for p in inputs.prompts[task.name]],
                                              task.maxNewTokens, batch_size, ctx, autocast)
    if inputs.general:
        collate = objectives.get("causal-lm").eval_collate
        out.generalPerplexity = evaluation.perplexity(module, inputs.general, collate, tokenizer.pad_token_id,
                                                      batch_size, ctx, settings.general.maxSamples, autocast)
    return out


def headline_metric(task: cfg.EvaluationTask) -> str:
    """The metric status and `kubectl get` show for a task: its gate's, else its first metric, else its first check."""
    if task.gate is not None:
        return task.gate.metric
    return task.metrics[0] if task.metrics else task.checks[0].name if task.checks else ""


def score(settings: cfg.Evaluation, inputs: Inputs, base: Measurement | None, tuned: Measurement) -> list[TaskScores]:
    out = []
    for task in settings.tasks:
        references = [p.reference for p in inputs.prompts[task.name]]
        checks = [Check(c.name, c.contains, c.pattern, c.ignoreCase) for c in task.checks]
        base_answers = base.answers.get(task.name) if base is not None else None
        out.append(score_task(task.name, references, tuned.answers[task.name], base_answers,
                              list(task.metrics), checks))
    return out


def gates(settings: cfg.Evaluation) -> list[scoring_gates.Gate]:
    out: list[scoring_gates.Gate] = []
    if settings.maxPerplexityRatio is not None:
        out.append(scoring_gates.PerplexityGate(settings.maxPerplexityRatio))
    if settings.general is not None and settings.general.maxPerplexityRise is not None:
        out.append(scoring_gates.GeneralGate(settings.general.maxPerplexityRise))
    out += [scoring_gates.TaskGate(task.name, task.gate.metric, task.gate.minScore, task.gate.minGain)
            for task in settings.tasks if task.gate is not None]
    return out


def task_results(settings: cfg.Evaluation, scores: list[TaskScores]) -> list[cfg.TaskResult]:
    by_name = {task.name: task for task in settings.tasks}
    return [cfg.TaskResult(name=s.name, rows=s.rows, headline=headline_metric(by_name[s.name]),
                           metrics=s.metrics, checks=s.checks) for s in scores]


def samples(inputs: Inputs, base: Measurement | None, tuned: Measurement, per_task: int) -> list[dict[str, str]]:
    """The first rows of each task side by side: prompt, reference, base answer, tuned answer."""
    out = []
    for task, prompts in inputs.prompts.items():
        for i, prompt in enumerate(prompts[:per_task]):
            base_answers = base.answers.get(task) if base is not None else None
            out.append({"task": task, "prompt": prompt.prompt_text, "reference": prompt.reference,
                        "base": base_answers[i] if base_answers else "", "tuned": tuned.answers[task][i]})
    return out
