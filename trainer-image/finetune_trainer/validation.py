"""Rules that span several fields, checked before any work (the CRD's CEL rules, and the trainer's own)."""

from __future__ import annotations

from .config import CANDIDATE_MODEL_RULE, EVALUATE_ONLY_RULE, TrainerConfig, evaluate_only_conflicts
from .errors import ConfigError


def problems(config: TrainerConfig) -> list[str]:
    found = []
    method, distributed = config.method, config.distributed
    if method.lora is not None and method.type not in ("lora", "qlora", "dora"):
        found.append("method.lora is only allowed with method.type lora, qlora or dora")
    if method.virtualTokens is not None and method.type not in ("prefix", "prompt"):
        found.append("method.virtualTokens is only allowed with method.type prefix or prompt")
    if method.freezeLayers is not None and method.type != "full":
        found.append("method.freezeLayers is only allowed with method.type full")
    if method.full is not None and method.type != "full":
        found.append("method.full is only allowed with method.type full")
    if method.full is not None and method.full.unfreeze is not None and (
            (method.full.unfreeze.everySteps is None) == (method.full.unfreeze.everyEpochs is None)):
        found.append("method.full.unfreeze: set exactly one of everySteps and everyEpochs")
    if method.full is not None and method.full.unfreeze is not None and method.freezeLayers is not None:
        found.append("method.full.unfreeze replaces method.freezeLayers: set unfreeze.floor instead")
    if distributed.zeroStage is not None and distributed.engine != "deepspeed":
        found.append("distributed.zeroStage is only allowed with engine deepspeed")
    if distributed.offload != "none" and distributed.engine != "deepspeed":
        found.append("distributed.offload needs engine deepspeed")
    if distributed.offload != "none" and distributed.zeroStage is not None and distributed.zeroStage < 2:
        found.append("distributed.offload needs zeroStage 2 or 3")
    if config.validation.uri and config.validation.splitRatio:
        found.append("validation: set either uri or splitRatio, not both")
    combine, evaluation = config.output.combine, config.evaluation
    if not config.datasets and not config.stages and (combine is None or combine.includeTrained) and not evaluation.only:
        found.append("datasets: at least one dataset (or stages) is required, unless output.combine has "
                     "includeTrained false (a combine-only job) or evaluation.only is set (an evaluate-only job)")
    if evaluate_only_conflicts(config):
        found.append(EVALUATE_ONLY_RULE)
    if evaluation.candidateModel is not None and not evaluation.only:
        found.append(CANDIDATE_MODEL_RULE)
    if method.adapter is not None and method.type == "full":
        found.append("method.adapter is only allowed with an adapter method (not full)")
    if method.adapter is not None and (method.lora is not None or method.virtualTokens is not None):
        found.append("method.adapter keeps the adapter's own settings: do not set method.lora or method.virtualTokens")
    if combine is not None and combine.includeTrained and method.type not in ("lora", "qlora"):
        found.append(f"output.combine.includeTrained needs method lora or qlora (a LoRA adapter), not {method.type}")
    if combine is not None and combine.svdRank is not None and combine.method != "svd":
        found.append("output.combine.svdRank is only allowed with method svd")
    if config.stages and len({s.name for s in config.stages}) != len(config.stages):
        found.append("stages: names must be unique")
    if config.output.merge and method.type in ("prefix", "prompt"):
        found.append(f"output.merge is impossible with method {method.type} (virtual tokens cannot be folded into weights)")
    if config.preprocessing.packing and method.type in ("prefix", "prompt"):
        found.append(f"preprocessing.packing is not allowed with method {method.type} (virtual tokens belong to one row)")
    if config.evaluation.maxPerplexityRatio is not None and not config.evaluation.compareToBase:
        found.append("evaluation.maxPerplexityRatio needs evaluation.compareToBase")
    found += [f"preprocessing.{p}" for p in config.preprocessing.content_filter_problems()]
    found += [f"evaluation.{p}" for p in config.evaluation.task_problems()]
    return found


def check(config: TrainerConfig) -> None:
    found = problems(config)
    if found:
        raise ConfigError("invalid TrainerConfig: " + "; ".join(found))
