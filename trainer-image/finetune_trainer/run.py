"""One run, start to end: config -> data -> model -> training stages -> evaluation -> outputs -> result.

Rank 0 writes the documents (data report, progress, evaluation, result); every rank trains,
checkpoints its own part and evaluates its share of the validation set.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import adapters
from . import config as cfg
from . import distributed, dropout, engines, events, evaluation, methods, objectives, outputs, schedule, task_evaluation, validation
from .checkpoint import TRAINER_STATE, CheckpointManager
from .report.model import ReportInput
from .report.render import render
from .scoring import gates as scoring_gates
from .data.pipeline import PreparedData, prepare
from .errors import ConfigError, DataError, EvaluationGateFailed, Preempted, TrainerError
from .exit_codes import SUCCEEDED
from .progress import (ProgressReporter, Throughput, eta_seconds, eval_history_from_state, eval_history_state,
                       evaluation_due, metrics_port, with_eval_point)
from .storage import Storage, from_config, join
from .train import StepReport, attach_reference_log_probs, run_loop

log = logging.getLogger(__name__)


@dataclass
class StagePlan:
    name: str
    datasets: list
    objective: str
    hyperparameters: cfg.Hyperparameters
    data: PreparedData | None = None
    total_steps: int = 0
    first_global_step: int = 0


@dataclass
class RunSummary:
    exit_code: int
    result: cfg.RunResult
    losses: dict[str, list[float]] = field(default_factory=dict)
    evaluation: cfg.EvaluationResult | None = None
    resumed_from_step: int = 0


def plan_stages(config: cfg.TrainerConfig) -> list[StagePlan]:
    if not config.stages:
        return [StagePlan("main", config.datasets, config.objective, config.hyperparameters)]
    return [StagePlan(s.name, s.datasets, s.objective, s.hyperparameters or config.hyperparameters) for s in config.stages]


class Preemption:
    """SIGTERM sets a flag; the loop checkpoints and exits at the next step boundary."""

    def __init__(self):
        self.requested = threading.Event()
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, lambda *_: self.requested.set())

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def load_model_and_tokenizer(storage: Storage, model_source: cfg.ModelSource, local_dir: Path, method_spec, device_type):
    from transformers import AutoTokenizer

    download_model(storage, model_source.uri, local_dir)
    gguf = {"gguf_file": model_source.ggufFile} if model_source.ggufFile else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(local_dir, **gguf)
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{model_source.uri}: cannot load a Hugging Face tokenizer: {e}") from None
    model = load_causal_lm(model_source, local_dir, method_spec, device_type)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def download_model(storage: Storage, uri: str, local_dir: Path) -> None:
    if not storage.download_prefix(uri, local_dir):
        raise DataError(f"{uri}: no model files under this prefix")


def attention_implementation(device_type: str) -> dict:
    """Varlen flash-attention on a GPU when the flash_attn package is in the image: a packed row then
    costs only its documents' own causal blocks. Otherwise transformers' default (SDPA where the model
    has it), with the block-diagonal mask it builds from the position_ids: the same result, but the
    masked blocks are computed too."""
    if device_type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return {"attn_implementation": "flash_attention_2"}
    return {}


def load_causal_lm(model_source: cfg.ModelSource, local_dir: Path, method_spec, device_type):
    from transformers import AutoModelForCausalLM

    gguf = {"gguf_file": model_source.ggufFile} if model_source.ggufFile else {}
    kwargs = {**attention_implementation(device_type), **method_spec.load_kwargs(device_type)}
    try:
        return AutoModelForCausalLM.from_pretrained(local_dir, **gguf, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        if isinstance(e, TrainerError):
            raise
        raise DataError(f"{model_source.uri}: cannot load a Hugging Face causal LM: {e}") from None


# What a candidate model must share with its base to answer the same prompts through the base's tokenizer.
SAME_ARCHITECTURE_FIELDS = ("model_type", "vocab_size")


def check_same_architecture(base_config, candidate_dir: Path, candidate_uri: str, model_uri: str) -> None:
    """Before the candidate's weights are loaded: its config.json against the base model's config."""
    from transformers import AutoConfig

    try:
        candidate_config = AutoConfig.from_pretrained(candidate_dir)
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"evaluation.candidateModel.uri {candidate_uri}: no readable Hugging Face config.json: "
                        f"{str(e)[:300]}") from None
    differences = [f"{name} {getattr(candidate_config, name, None)!r} (base {getattr(base_config, name, None)!r})"
                   for name in SAME_ARCHITECTURE_FIELDS
                   if getattr(candidate_config, name, None) != getattr(base_config, name, None)]
    if differences:
        raise ConfigError(f"evaluation.candidateModel.uri {candidate_uri} is not a model of the same architecture "
                          f"and vocabulary as {model_uri}: {', '.join(differences)}")


class Run:
    def __init__(self, config: cfg.TrainerConfig, work_dir: Path):
        self.config = config
        self.work_dir = work_dir
        self.out = config.output.uri
        self.run_id = config.job.runId

    # ---- documents ----

    def uri(self, name: str) -> str:
        return cfg.run_prefix(self.out, self.run_id) + name

    def write_result(self, result: cfg.RunResult) -> None:
        if self.ctx.is_main:
            self.storage.put_json(cfg.result_uri(self.out, self.run_id), result.model_dump(mode="json"))

    # ---- the run ----

    def execute(self) -> RunSummary:
        config = self.config
        validation.check(config)
        self.ctx = distributed.init(config.distributed.engine)
        events.enable(self.ctx.is_main)
        self.storage = from_config(config.storage)
        previous = self.storage.get_json(cfg.result_uri(self.out, self.run_id))
        if previous and previous.get("succeeded"):
            events.emit("already-succeeded", result=previous)
            return RunSummary(SUCCEEDED, cfg.RunResult(**previous))
        self.preemption = Preemption()
        port = metrics_port(config.runtime.metricsPort) if self.ctx.is_main else 0
        self.reporter = ProgressReporter(self.storage if self.ctx.is_main else None,
                                         cfg.progress_uri(self.out, self.run_id), config.runtime.progressIntervalSeconds, port)
        try:
            return self._train_and_finish()
        finally:
            self.reporter.close()
            self.preemption.restore()

    def _train_and_finish(self) -> RunSummary:
        config, ctx = self.config, self.ctx
        if adapters.combine_only(config):
            return self._combine_only()
        if config.evaluation.only:
            return self._evaluate_only()
        hp0 = plan_stages(config)[0].hyperparameters
        torch.manual_seed(hp0.seed)
        method_spec = methods.get(config.method.type)
        self.base_dir = self.work_dir / f"rank-{ctx.rank}" / "base-model"
        model, tokenizer = load_model_and_tokenizer(self.storage, config.model, self.base_dir, method_spec, ctx.device_type)
        self.tokenizer = tokenizer
        if config.distributed.gradientCheckpointing:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()

        plans = self._prepare_data(tokenizer)
        self.eval_inputs = task_evaluation.load_inputs(self.storage, config.evaluation, tokenizer,
                                                       config.preprocessing.maxSeqLength, hp0.seed)
        torch.manual_seed(hp0.seed)
        if config.method.adapter is not None:
            model = adapters.continue_from(self.storage, model, config.method, config.model.uri, self.base_dir,
                                           self.work_dir / f"rank-{ctx.rank}" / "continue-adapter", ctx.device_type)
        else:
            model = method_spec.apply(model, config.method, ctx.device_type)
        # method.full's strategies (None for other methods); L2-SP anchors the base weights when the first engine is
        # created, before any restore.
        full_strategies = methods.full.strategies(model, config.method, stage_epoch_starts(plans, ctx.world_size))
        # Each stage sets its dropout from the model as built: off for a preference stage, these rates for any other.
        dropout_rates = dropout.configured_rates(model)

        checkpoints = CheckpointManager(self.storage, cfg.checkpoint_prefix(config.checkpoint.uri, self.out, self.run_id),
                                        self.work_dir / "checkpoints", ctx.rank, ctx.world_size, config.checkpoint.keep)
        latest = checkpoints.latest()
        resume_state = self.storage.get_json(join(latest[1], TRAINER_STATE)) if latest else None
        resumed_from = latest[0] if latest else 0
        if latest:
            check_same_world_size(self.storage, latest[1], ctx.world_size)
            events.emit("resume", checkpoint=latest[1], step=latest[0])
        base_perplexity = resume_state.get("basePerplexity") if resume_state else None
        self.base_measurement = task_evaluation.Measurement.from_state((resume_state or {}).get("baseMeasurement"))
        losses: dict[str, list[float]] = dict(resume_state.get("losses", {})) if resume_state else {}
        self.learning_rates: list[list[float]] = list((resume_state or {}).get("learningRates", []))
        self.eval_history = eval_history_from_state(resume_state)
        self.dataset_losses = [cfg.DatasetLoss.model_validate(r) for r in (resume_state or {}).get("datasetLosses", [])]
        pad_id = tokenizer.pad_token_id
        grand_total = plans[-1].first_global_step + plans[-1].total_steps
        # Periodic evaluations measure what the final one does (the last stage's validation set), so the
        # history is one curve that ends with the final value.
        eval_plan, eval_objective = plans[-1], objectives.get(plans[-1].objective)
        engine = None
        for index, plan in enumerate(plans):
            if resume_state and index < resume_state["stage"]:
                continue
            objective = objectives.get(plan.objective)
            dropout.set_for_stage(model if engine is None else engine.module, dropout_rates,
                                  preference=objective.needs_reference)
            engine = engines.create(model if engine is None else engine.module, plan.hyperparameters, plan.total_steps,
                                    ctx, config.distributed, full_strategies)
            resuming_here = bool(resume_state) and index == resume_state["stage"]
            start_step = 0
            if resuming_here:
                checkpoints.restore(latest[1], engine)
                start_step = resume_state["stageStep"]
                if resume_state.get("reference") is not None:
                    for item, ref in zip(plan.data.rows(), resume_state["reference"]):
                        item.reference = tuple(ref)
            else:
                if index == 0 and config.evaluation.compareToBase and base_perplexity is None:
                    base_perplexity = self._evaluate(engine, eval_plan, eval_objective, base=True,
                                                     uses_adapter=method_spec.uses_adapter)
                    events.emit("base-evaluation", perplexity=base_perplexity)
                if index == 0 and not self.eval_inputs.empty and self.base_measurement is None:
                    self.base_measurement = self._measure(engine, base=True, uses_adapter=method_spec.uses_adapter)
                    events.emit("base-task-evaluation", tasks=list(self.base_measurement.answers),
                                generalPerplexity=self.base_measurement.generalPerplexity)
                if objective.needs_reference:
                    # Virtual tokens start random: before any training the reference is the base model (as TRL's
                    # disabled adapter), not the base with random virtual tokens.
                    untrained_virtual_tokens = (index == 0 and config.method.type in ("prefix", "prompt")
                                                and config.method.adapter is None)
                    with engine.module.disable_adapter() if untrained_virtual_tokens else _nothing():
                        attach_reference_log_probs(engine.module, plan.data.rows(), objective.collate,
                                                   objective.reference_log_probs, pad_id,
                                                   plan.hyperparameters.batchSize, ctx, engine.autocast)
            stage_losses = losses.setdefault(plan.name, [])
            if plan.data.interleave:
                self.dataset_losses = with_dataset_losses(self.dataset_losses, plan, {}, 0)
                self.reporter.update(datasetLosses=self.dataset_losses)
            throughput = Throughput()
            self.reporter.update(stage=plan.name, totalSteps=grand_total, resumedFromStep=resumed_from,
                                 step=plan.first_global_step + start_step, checkpoints=checkpoints.records)
            per_epoch = schedule.steps_per_epoch(len(plan.data.train), ctx.world_size, plan.hyperparameters.batchSize,
                                                 plan.hyperparameters.gradientAccumulationSteps)

            def trainer_state(stage_step: int) -> dict:
                reference = [list(i.reference) for i in plan.data.rows()] if objective.needs_reference else None
                return {"stage": index, "stageName": plan.name, "stageStep": stage_step,
                        "globalStep": plan.first_global_step + stage_step, "basePerplexity": base_perplexity,
                        "losses": losses, "reference": reference,
                        "evalHistory": eval_history_state(self.eval_history),
                        "datasetLosses": [r.model_dump(mode="json") for r in self.dataset_losses],
                        "baseMeasurement": self.base_measurement.to_state() if self.base_measurement else None,
                        "learningRates": self.learning_rates}

            def after_step(report: StepReport) -> None:
                stage_losses.append(report.loss)
                self.learning_rates.append([plan.first_global_step + report.step, report.learning_rate])
                throughput.add(report.tokens)
                global_step = plan.first_global_step + report.step
                rate = throughput.rate()
                seconds_per_step = report.tokens / rate if rate else None
                events.emit("step", stage=plan.name, step=global_step, stageStep=report.step, loss=report.loss,
                            learningRate=report.learning_rate, tokens=report.tokens, seconds=round(report.seconds, 4),
                            **({"metrics": report.metrics} if report.metrics else {}),
                            **(full_strategies.step_fields(ctx.device) if full_strategies else {}),
                            **({"datasetLosses": [{"index": i, "uri": plan.datasets[i].uri, "loss": loss}
                                                  for i, loss in sorted(report.dataset_losses.items())]}
                               if report.dataset_losses else {}))
                if report.dataset_losses:
                    self.dataset_losses = with_dataset_losses(self.dataset_losses, plan, report.dataset_losses,
                                                              global_step)
                    self.reporter.update(datasetLosses=self.dataset_losses)
                self.reporter.update(step=global_step, epoch=report.step / per_epoch, loss=report.loss,
                                     learningRate=report.learning_rate, tokensPerSecond=rate,
                                     etaSeconds=eta_seconds(global_step, grand_total, seconds_per_step))
                if evaluation_due(global_step, config.evaluation.everySteps, grand_total):
                    self._record_evaluation(global_step, self._evaluate(engine, eval_plan, eval_objective))
                if report.step % config.checkpoint.everySteps == 0 and report.step < plan.total_steps:
                    started = time.perf_counter()
                    checkpoints.save(global_step, engine, trainer_state(report.step))
                    self.reporter.checkpoint_saved()
                    events.emit("checkpoint", step=global_step, blockingSeconds=round(time.perf_counter() - started, 4))
                self.reporter.update(checkpoints=checkpoints.records)

            def before_step(stage_step: int) -> None:
                """Gradual unfreezing: the trainable blocks of the next step (a pure function of the global step)."""
                if full_strategies and full_strategies.before_step(engine.module, plan.first_global_step + stage_step):
                    engine.trainable_changed()

            loop = run_loop(engine, objective, plan.data, plan.hyperparameters, ctx, pad_id, start_step,
                            plan.total_steps, plan.hyperparameters.seed, self.preemption.requested.is_set, after_step,
                            before_step=before_step)
            if loop.stopped_at is not None:
                checkpoints.save(plan.first_global_step + loop.stopped_at, engine, trainer_state(loop.stopped_at),
                                 background=False)
                events.emit("preempted", step=plan.first_global_step + loop.stopped_at)
                raise Preempted(f"SIGTERM: checkpoint saved at step {plan.first_global_step + loop.stopped_at}")
            if index < len(plans) - 1:
                checkpoints.save(plan.first_global_step + plan.total_steps, engine, trainer_state(plan.total_steps),
                                 background=False)
                self._save_outputs(engine, method_spec, cfg.stage_output_uri(self.out, plan.name), merge=False)
        checkpoints.wait()
        self.reporter.update(checkpoints=checkpoints.records)
        return self._finish(engine, plans, method_spec, base_perplexity, losses, resumed_from)

    def _prepare_data(self, tokenizer) -> list[StagePlan]:
        config, ctx = self.config, self.ctx
        plans = plan_stages(config)
        reports = {}
        first_global = 0
        for plan in plans:
            plan.data = prepare(self.storage, tokenizer, plan.datasets, config.validation, config.preprocessing,
                                plan.objective, plan.hyperparameters.seed)
            plan.total_steps = schedule.total_steps(len(plan.data.train), ctx.world_size, plan.hyperparameters)
            plan.first_global_step = first_global
            first_global += plan.total_steps
            reports[plan.name] = {**plan.data.report, "totalSteps": plan.total_steps}
        if ctx.is_main:
            self.storage.put_json(cfg.data_report_uri(self.out, self.run_id), {"stages": reports})
            self.reporter.update(data=cfg.DataSummary.from_reports(reports))
        events.emit("data-report", stages={k: {"trainSequences": v["trainSequences"], "rowsDropped": v["rowsDropped"]}
                                           for k, v in reports.items()})
        self.data_reports = reports
        return plans

    def _measure(self, engine, base: bool, uses_adapter: bool) -> task_evaluation.Measurement:
        """evaluation.tasks' answers (of the base model only with compareToBase) and evaluation.general's perplexity."""
        module = engine.module
        with module.disable_adapter() if base and uses_adapter else _nothing():
            return task_evaluation.measure(module, self.tokenizer, self.eval_inputs, self.config.evaluation, self.ctx,
                                           self.config.hyperparameters.batchSize, engine.autocast,
                                           answers=not base or self.config.evaluation.compareToBase)

    def _evaluate(self, engine, plan: StagePlan, objective, base: bool = False, uses_adapter: bool = True):
        module = engine.module
        context = module.disable_adapter() if base and uses_adapter else _nothing()
        with context:
            return evaluation.perplexity(module, plan.data.validation, objective.eval_collate, self.tokenizer.pad_token_id,
                                         plan.hyperparameters.batchSize, self.ctx, self.config.evaluation.maxSamples,
                                         engine.autocast)

    def _record_evaluation(self, global_step: int, perplexity: float | None) -> None:
        """Every rank keeps the history (it goes into the checkpoint's trainer state); rank 0 writes progress.json
        at once, since a search decides on it whether to prune this trial."""
        if perplexity is None:
            return
        point = cfg.EvalPoint(step=global_step, evalLoss=math.log(perplexity))
        self.eval_history = with_eval_point(self.eval_history, point)
        events.emit("eval", step=global_step, evalLoss=point.evalLoss)
        self.reporter.update(evalLoss=point.evalLoss, evalHistory=self.eval_history)
        self.reporter.flush()

    def _save_outputs(self, engine, method_spec, output_uri: str, merge: bool) -> tuple[str | None, str | None]:
        """Adapter (or the full model) and, if asked, the merged model; collective, rank 0 uploads."""
        local = self.work_dir / "outputs" / output_uri.rstrip("/").rsplit("/", 1)[-1]
        adapter_uri = merged_uri = None
        with engine.full_parameters():
            if self.ctx.is_main:
                trained = outputs.save_trained(engine.module, method_spec.uses_adapter, self.tokenizer, local / "trained")
                self.trained_dir = trained  # output.combine's input when includeTrained
        if self.ctx.is_main:
            card = outputs.model_card(self.config.to_json(), getattr(self, "evaluation_document", {}),
                                      self.data_reports.get(list(self.data_reports)[-1], {}), self.config.model.uri,
                                      method_spec.uses_adapter, getattr(self, "losses", {}),
                                      getattr(self, "rejected", None),
                                      getattr(self, "evaluation_document", {}).get("reportUri"))
            outputs.write_model_card(trained, card)
            if method_spec.uses_adapter:
                adapters.write_base(trained, self.config.model.uri, adapters.base_fingerprint(self.base_dir))
                adapter_uri = cfg.adapter_uri(output_uri)
                self.storage.upload_dir(trained, adapter_uri)
                if merge:
                    gguf = {"gguf_file": self.config.model.ggufFile} if self.config.model.ggufFile else {}
                    merged = outputs.merge_adapter(self.base_dir, trained, self.tokenizer, local / "merged", gguf)
                    outputs.write_model_card(merged, card)
                    merged_uri = cfg.merged_uri(output_uri)
                    self.storage.upload_dir(merged, merged_uri)
            else:
                merged_uri = cfg.merged_uri(output_uri)
                self.storage.upload_dir(trained, merged_uri)
        distributed.barrier()
        return adapter_uri, merged_uri

    def _finish(self, engine, plans, method_spec, base_perplexity, losses, resumed_from) -> RunSummary:
        """The final evaluation, the gates, the outputs (written also when a gate rejects the model, for the user to
        inspect: the model card says it was rejected) and the report."""
        config = self.config
        last = plans[-1]
        perplexity = self._evaluate(engine, last, objectives.get(last.objective))
        tuned = (self._measure(engine, base=False, uses_adapter=method_spec.uses_adapter)
                 if not self.eval_inputs.empty else None)
        result_eval = self._evaluation_result(base_perplexity, perplexity, tuned)
        self.evaluation_document = result_eval.model_dump(mode="json", exclude_none=True)
        self.losses = losses
        self.rejected = rejected_by(result_eval)
        if self.ctx.is_main:
            self.storage.put_json(cfg.evaluation_uri(self.out, self.run_id), result_eval.model_dump(mode="json"))
        events.emit("evaluation", **{k: v for k, v in self.evaluation_document.items() if k not in ("tasks", "gates")},
                    **({"tasks": {t.name: {m: p.tuned for m, p in t.metrics.items()} for t in result_eval.tasks}}
                       if result_eval.tasks else {}))
        self._record_evaluation(last.first_global_step + last.total_steps, perplexity)
        adapter_uri, merged_uri = self._save_outputs(engine, method_spec, self.out, merge=config.output.merge)
        if self.ctx.is_main:
            self._write_report(result_eval, plans, losses, tuned)
        enforce_gates(self.rejected, config.runtime.enforceGates,
                      "the outputs are written, marked rejected in the model card")
        combined_uri = self._combine(include_trained=True) if config.output.combine else None
        result = cfg.RunResult(succeeded=True, reason="Succeeded",
                               message=f"trained {sum(len(v) for v in losses.values())} steps", adapterUri=adapter_uri,
                               mergedUri=merged_uri, combinedUri=combined_uri)
        self.write_result(result)
        return RunSummary(SUCCEEDED, result, losses, result_eval, resumed_from)

    def _evaluation_result(self, base_perplexity, perplexity, tuned: task_evaluation.Measurement | None
                           ) -> cfg.EvaluationResult:
        settings = self.config.evaluation
        base = self.base_measurement
        ratio = perplexity / base_perplexity if base_perplexity and perplexity is not None else None
        general = None
        if tuned is not None and tuned.generalPerplexity is not None:
            general_base = base.generalPerplexity if base else None
            general = cfg.GeneralResult(basePerplexity=general_base, perplexity=tuned.generalPerplexity,
                                        rise=tuned.generalPerplexity / general_base - 1 if general_base else None)
        scores = task_evaluation.score(settings, self.eval_inputs, base, tuned) if tuned and settings.tasks else []
        outcomes = scoring_gates.evaluate_gates(
            {"base": base_perplexity, "tuned": perplexity},
            {"base": general.basePerplexity, "tuned": general.perplexity} if general else None,
            scores, task_evaluation.gates(settings))
        return cfg.EvaluationResult(
            basePerplexity=base_perplexity, perplexity=perplexity, ratio=ratio,
            maxPerplexityRatio=settings.maxPerplexityRatio, passed=all(o.passed for o in outcomes),
            tasks=task_evaluation.task_results(settings, scores), general=general,
            gates=[cfg.GateResult(**o.to_dict()) for o in outcomes],
            reportUri=cfg.report_uri(self.out, self.run_id))

    def _write_report(self, result_eval: cfg.EvaluationResult, plans, losses, tuned) -> None:
        """report.md, report.html and the plots under runs/<runId>/report/ (rank 0)."""
        train = [[plan.first_global_step + i + 1, loss] for plan in plans for i, loss in enumerate(losses.get(plan.name, []))]
        report = ReportInput(
            job=f"{self.config.job.namespace}/{self.config.job.name}", runId=self.run_id, modelUri=self.config.model.uri,
            outputUri=self.out, rejected=bool(self.rejected), rejectedReasons=self.rejected,
            perplexity={"base": result_eval.basePerplexity, "tuned": result_eval.perplexity, "ratio": result_eval.ratio},
            general=({"base": result_eval.general.basePerplexity, "tuned": result_eval.general.perplexity,
                      "rise": result_eval.general.rise} if result_eval.general else None),
            tasks=[t.model_dump(mode="json") for t in result_eval.tasks],
            gates=[g.model_dump(mode="json") for g in result_eval.gates],
            history={"train": train, "validation": [[p.step, p.evalLoss] for p in self.eval_history],
                     "learningRate": self.learning_rates},
            data=cfg.DataSummary.from_reports(self.data_reports).model_dump(mode="json"),
            samples=task_evaluation.samples(self.eval_inputs, self.base_measurement, tuned,
                                            self.config.evaluation.reportSamples) if tuned else [])
        prefix = cfg.report_uri(self.out, self.run_id)
        for name, content in render(report, self.config.evaluation.reportSamples).items():
            kind = {"md": "text/markdown", "html": "text/html", "png": "image/png"}[name.rsplit(".", 1)[-1]]
            self.storage.put_bytes(prefix + name, content, content_type=kind)
        events.emit("report", uri=prefix)

    # ---- adapter combination (output.combine) ----

    def _combine(self, include_trained: bool) -> str | None:
        """Rank 0 combines and uploads to <output.uri>combined/; collective."""
        combination, uri = self.config.output.combine, None
        if self.ctx.is_main:
            gguf = {"gguf_file": self.config.model.ggufFile} if self.config.model.ggufFile else {}
            trained = self.trained_dir if include_trained and combination.includeTrained else None
            combined = adapters.combine(self.storage, combination, self.base_dir, gguf, trained, self.tokenizer,
                                        self.work_dir / "combine", self.config.model.uri)
            uri = cfg.combined_uri(self.out)
            self.storage.upload_dir(combined, uri)
            events.emit("combined", uri=uri, method=combination.method, adapters=len(combination.adapters)
                        + (trained is not None))
        distributed.barrier()
        return uri

    def _evaluate_only(self) -> RunSummary:
        """evaluation.only: a candidate against its base model, no training; evaluation.json, the report and
        result.json are the outputs (the gates decide the run as after training: enforce_gates). An adapter (method.adapter) is
        measured on and off its base; a whole model (evaluation.candidateModel) after the base, which is freed
        first, so that one model is in memory at a time."""
        config, ctx = self.config, self.ctx
        method_spec = methods.get(config.method.type)
        self.base_dir = self.work_dir / f"rank-{ctx.rank}" / "base-model"
        model, self.tokenizer = load_model_and_tokenizer(self.storage, config.model, self.base_dir, method_spec,
                                                         ctx.device_type)
        self.eval_inputs = task_evaluation.load_inputs(self.storage, config.evaluation, self.tokenizer,
                                                       config.preprocessing.maxSeqLength, config.hyperparameters.seed)
        self.eval_history, self.learning_rates, self.data_reports = [], [], {}
        candidate_model = config.evaluation.candidateModel
        if candidate_model is None:
            model = adapters.continue_from(self.storage, model, config.method, config.model.uri, self.base_dir,
                                           self.work_dir / f"rank-{ctx.rank}" / "candidate-adapter", ctx.device_type)
            candidate = _Evaluated(model.to(ctx.device))
            self.base_measurement = self._measure(candidate, base=True, uses_adapter=True)
            tuned = self._measure(candidate, base=False, uses_adapter=True)
            candidate_uri = config.method.adapter.uri
        else:
            base_config = model.config
            self.base_measurement = self._measure(_Evaluated(model.to(ctx.device)), base=True, uses_adapter=False)
            del model
            candidate_dir = self.work_dir / f"rank-{ctx.rank}" / "candidate-model"
            download_model(self.storage, candidate_model.uri, candidate_dir)
            check_same_architecture(base_config, candidate_dir, candidate_model.uri, config.model.uri)
            candidate = load_causal_lm(cfg.ModelSource(uri=candidate_model.uri), candidate_dir, method_spec,
                                       ctx.device_type)
            tuned = self._measure(_Evaluated(candidate.to(ctx.device)), base=False, uses_adapter=False)
            candidate_uri = candidate_model.uri
        result_eval = self._evaluation_result(None, None, tuned)
        self.rejected = rejected_by(result_eval)
        if ctx.is_main:
            self.storage.put_json(cfg.evaluation_uri(self.out, self.run_id), result_eval.model_dump(mode="json"))
            self._write_report(result_eval, [], {}, tuned)
        events.emit("evaluation", tasks={t.name: {m: p.tuned for m, p in t.metrics.items()} for t in result_eval.tasks})
        distributed.barrier()
        enforce_gates(self.rejected, config.runtime.enforceGates,
                      "evaluation.json and the report are written, marked rejected")
        result = cfg.RunResult(succeeded=True, reason="Succeeded",
                               message=f"evaluated {candidate_uri} against {config.model.uri} (no training)")
        self.write_result(result)
        return RunSummary(SUCCEEDED, result, {}, result_eval)

    def _combine_only(self) -> RunSummary:
        """A job with no datasets: only output.combine (no training, no evaluation)."""
        from transformers import AutoTokenizer

        self.base_dir = self.work_dir / f"rank-{self.ctx.rank}" / "base-model"
        if self.ctx.is_main:
            download_model(self.storage, self.config.model.uri, self.base_dir)
            gguf = {"gguf_file": self.config.model.ggufFile} if self.config.model.ggufFile else {}
            self.tokenizer = AutoTokenizer.from_pretrained(self.base_dir, **gguf)
        combined_uri = self._combine(include_trained=False)
        result = cfg.RunResult(succeeded=True, reason="Succeeded",
                               message=f"combined {len(self.config.output.combine.adapters)} adapters",
                               combinedUri=combined_uri)
        self.write_result(result)
        return RunSummary(SUCCEEDED, result)


def rejected_by(result_eval: cfg.EvaluationResult) -> list[str]:
    """The messages of the gates that failed (empty: the model is accepted); the model card and the report mark
    the outputs rejected with them, whether or not the run fails on them."""
    return [g.message for g in result_eval.gates if not g.passed]


def enforce_gates(rejected: list[str], enforce: bool, written: str) -> None:
    """The gates' verdict on the run, one for a training run and an evaluate-only one, decided after their outputs
    are written (`written` says which): a failed gate fails the run (EvaluationGateFailed, exit code 4) unless
    runtime.enforceGates is false (a search's trial: its gates are recorded in evaluation.json and the search
    judges the promoted trial by them)."""
    if rejected and enforce:
        raise EvaluationGateFailed("; ".join(rejected) + f" ({written}; see the evaluation report)")


def with_dataset_losses(records: list[cfg.DatasetLoss], plan: StagePlan, losses: dict[int, float],
                        global_step: int) -> list[cfg.DatasetLoss]:
    """progress.json's datasetLosses with one step's per-dataset losses of a stage; every dataset of the stage
    has a record (loss not set until it trains), in stage and dataset order."""
    by_key = {(r.stage, r.index): r for r in records}
    for index, dataset in enumerate(plan.datasets):
        old = by_key.get((plan.name, index)) or cfg.DatasetLoss(stage=plan.name, index=index, uri=dataset.uri)
        if index in losses:
            old = old.model_copy(update={"loss": losses[index], "step": global_step, "steps": old.steps + 1})
        by_key[(plan.name, index)] = old
    return list(by_key.values())


def stage_epoch_starts(plans: list[StagePlan], world_size: int) -> tuple[int, ...]:
    """The global steps at which an epoch of any stage starts (gradual unfreezing's everyEpochs)."""
    from .methods.unfreezing import epoch_starts

    return epoch_starts([(p.first_global_step, p.total_steps,
                          schedule.steps_per_epoch(len(p.data.train), world_size, p.hyperparameters.batchSize,
                                                   p.hyperparameters.gradientAccumulationSteps)) for p in plans])


def check_same_world_size(storage: Storage, checkpoint_uri: str, world_size: int) -> None:
    """Each rank's data shard and optimizer partition depend on the number of processes: a checkpoint
    resumes only with the world size that wrote it."""
    from .checkpoint import MANIFEST

    written_by = (storage.get_json(join(checkpoint_uri, MANIFEST)) or {}).get("worldSize")
    if written_by is not None and written_by != world_size:
        raise ConfigError(f"checkpoint {checkpoint_uri} was written by {written_by} processes, this run has {world_size}: "
                          f"a run resumes only with the same workers and GPUs per worker (set a new spec.runId to "
                          f"start over)")


@dataclass
class _Evaluated:
    """A model evaluated without an engine (evaluation.only): what _measure needs of one."""

    module: object
    autocast: type = contextlib.nullcontext


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _is_rank_zero() -> bool:
    """From the environment: also right when the failure came before the process group existed."""
    return os.environ.get("RANK", "0") == "0"


def write_final_result(config: cfg.TrainerConfig, result: cfg.RunResult) -> None:
    """result.json from rank 0, also when the failure came before the process group existed."""
    if not _is_rank_zero():
        return
    try:
        from_config(config.storage).put_json(cfg.result_uri(config.output.uri, config.job.runId),
                                             result.model_dump(mode="json"))
    except TrainerError as e:
        log.warning("could not write result.json: %s", e)


# How long the other ranks of a permanently failed run wait for rank 0's result.json before exiting.
FINAL_RESULT_WAIT_SECONDS = 60.0


def await_final_result(config: cfg.TrainerConfig, timeout: float = FINAL_RESULT_WAIT_SECONDS,
                       poll: float = 0.5) -> bool:
    """On a permanent failure every rank fails alike, but only rank 0 writes result.json; the others
    stay until it is there. The PyTorchJob fails with its first failed replica and the operator reads
    the run's outcome then: a worker that exited first would leave the job the training-operator's
    "Worker replica(s) failed" instead of the trainer's reason. Bounded: a rank 0 that died writes
    nothing. True when the result was seen."""
    if _is_rank_zero():
        return True
    uri = cfg.result_uri(config.output.uri, config.job.runId)
    storage = from_config(config.storage)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if storage.exists(uri):
                return True
        except TrainerError as e:
            log.warning("cannot look for %s: %s", uri, e)
        if time.monotonic() >= deadline:
            log.warning("rank 0 wrote no %s within %.0fs; exiting without it", uri, timeout)
            return False
        time.sleep(poll)


def execute(config: cfg.TrainerConfig, work_dir: Path | None = None) -> RunSummary:
    """Run a TrainerConfig; TrainerErrors become a RunSummary with their exit code (and, for
    permanent failures, a result.json saying why)."""
    work = Path(work_dir or os.environ.get("FINETUNE_TRAINER_WORK_DIR") or tempfile.mkdtemp(prefix="finetune-"))
    run = Run(config, work)
    try:
        return run.execute()
    except TrainerError as e:
        result = cfg.RunResult(succeeded=False, reason=e.reason, message=str(e))
        events.emit("failed", reason=e.reason, message=str(e), exitCode=e.exit_code)
        if e.exit_code in (ConfigError.exit_code, DataError.exit_code, EvaluationGateFailed.exit_code):
            write_final_result(config, result)
            await_final_result(config)
        return RunSummary(e.exit_code, result)
    finally:
        distributed.destroy()
