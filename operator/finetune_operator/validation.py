"""Validation of a FineTuneJob against the cluster and the storage, as pure functions over facts.

The reconcile gathers the facts (does the Secret exist, which keys it has, which S3 URIs exist);
the validators here turn them into problems: (reason, message naming the field). The CEL rules in
the CRD already reject most bad specs; the spec-level validators repeat the cross-field ones so a
FineTuneJob stored before a CRD upgrade (or without CEL support) is still refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from pydantic import ValidationError

from finetune_operator import endpoints, quantity, tenancy
from finetune_operator.api.types import EVALUATE_ONLY_RULE, FineTuneJobSpec, parse_spec
from finetune_operator.problems import DIGEST, Problem, image_from
from finetune_operator.builders.names import CREDENTIAL_KEYS, CREDENTIALS_OPT_IN_LABEL
from finetune_operator.config import OperatorConfig
from finetune_trainer.config import CANDIDATE_MODEL_RULE, evaluate_only_conflicts


@dataclass(frozen=True)
class S3Check:
    """What a HEAD/LIST of one URI said: exists True/False (False with an error: access refused), or
    None with an error (could not ask: network, endpoint down -- a transient problem)."""

    exists: bool | None
    error: str = ""


@dataclass
class Facts:
    """What the reconcile observed for validation. None means 'not observed (yet)'."""

    secret_found: bool | None = None
    secret_keys: frozenset[str] = frozenset()
    secret_blank_keys: frozenset[str] = frozenset()  # credential keys whose value is empty or whitespace
    secret_opted_in: bool = False  # the Secret carries CREDENTIALS_OPT_IN_LABEL=true
    s3: dict[str, S3Check] = field(default_factory=dict)  # spec field path -> check
    endpoint_addresses: tuple[Any, ...] | None = None  # what spec.storage.endpoint's host resolved to
    endpoint_unanswered: bool = False  # the resolver gave no answer in time (the endpoint is not judged as valid)
    api_server_addresses: tuple[Any, ...] = ()
    policy: tenancy.Policy | None = None  # the TenantPolicy governing the job's namespace
    policy_problem: Problem | None = None  # no policy where one is required, more than one, or one that does not parse
    run_settings: dict[str, Any] | None = None  # of the run that exists: what its policy filled in when it was made


# ---- spec ----------------------------------------------------------------------------------------


def _loc(loc: Iterable[Any]) -> str:
    out = "spec"
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def parse_or_problems(raw_spec: dict[str, Any]) -> tuple[FineTuneJobSpec | None, list[Problem]]:
    try:
        return parse_spec(raw_spec), []
    except ValidationError as exc:
        return None, [Problem("InvalidSpec", f"{_loc(e['loc'])}: {e['msg']}") for e in exc.errors()]


def check_datasets_or_stages(spec: FineTuneJobSpec, cfg: OperatorConfig) -> list[Problem]:
    combine = spec.output.combine
    if (not spec.datasets and not spec.stages and (combine is None or combine.includeTrained)
            and not spec.evaluation.only):
        return [Problem("InvalidSpec", "spec.datasets: set datasets or stages (at least one must be non-empty), or "
                                       "output.combine with includeTrained false (a combine-only job), or "
                                       "evaluation.only (an evaluate-only job)")]
    return []


def check_evaluate_only(spec: FineTuneJobSpec, cfg: OperatorConfig) -> list[Problem]:
    if evaluate_only_conflicts(spec):
        return [Problem("InvalidSpec", EVALUATE_ONLY_RULE)]
    if spec.evaluation.candidateModel is not None and not spec.evaluation.only:
        return [Problem("InvalidSpec", "spec." + CANDIDATE_MODEL_RULE)]
    return []


def check_adapter_reuse(spec: FineTuneJobSpec, cfg: OperatorConfig) -> list[Problem]:
    """method.adapter (continue from an adapter) and output.combine (combine LoRA adapters)."""
    m, combine, out = spec.method, spec.output.combine, []
    if m.adapter is not None and m.type == "full":
        out.append(Problem("InvalidSpec", "spec.method.adapter: only allowed with an adapter method, not full"))
    if m.adapter is not None and (m.lora is not None or m.virtualTokens is not None):
        out.append(Problem("InvalidSpec", "spec.method.adapter: the adapter keeps its own settings; do not set "
                                          "method.lora or method.virtualTokens"))
    if combine is not None and combine.includeTrained and m.type not in ("lora", "qlora"):
        out.append(Problem("InvalidSpec", f"spec.output.combine.includeTrained: needs method lora or qlora (a LoRA "
                                          f"adapter), not {m.type}"))
    if combine is not None and combine.svdRank is not None and combine.method != "svd":
        out.append(Problem("InvalidSpec", "spec.output.combine.svdRank: only allowed with method svd"))
    return out


def check_unique_stage_names(spec: FineTuneJobSpec, cfg: OperatorConfig) -> list[Problem]:
    seen: set[str] = set()
    out = []
    for i, stage in enumerate(spec.stages):
        if stage.name in seen:
            out.append(Problem("InvalidSpec", f"spec.stages[{i}].name: duplicate stage name {stage.name!r}"))
        seen.add(stage.name)
    return out


def check_dpo_datasets(spec: FineTuneJobSpec, cfg: OperatorConfig) -> list[Problem]:
    out = []
    if spec.objective == "dpo":
        for i, d in enumerate(spec.datasets):
            if d.format != "preference":
                out.append(Problem("InvalidSpec", f"spec.datasets[{i}].format: objective dpo needs preference, got {d.format}"))
    for s, stage in enumerate(spec.stages):
        if stage.objective == "dpo":
            for i, d in enumerate(stage.datasets):
                if d.format != "preference":
                    out.append(Problem("InvalidSpec",
                                       f"spec.stages[{s}].datasets[{i}].format: objective dpo needs preference, got {d.format}"))
    return out


def _kto_dataset_problems(path: str, objective: str, datasets) -> list[Problem]:
    """Objective kto and format feedback go together, both ways."""
    out = []
    for i, d in enumerate(datasets):
        if objective == "kto" and d.format != "feedback":
            out.append(Problem("InvalidSpec", f"{path}[{i}].format: objective kto needs feedback, got {d.format}"))
        elif objective != "kto" and d.format == "feedback":
            out.append(Problem("InvalidSpec", f"{path}[{i}].format: feedback needs objective kto, got {objective}"))
    return out


def check_kto_datasets(spec: FineTuneJobSpec, cfg: OperatorConfig) -> list[Problem]:
    out = _kto_dataset_problems("spec.datasets", spec.objective, spec.datasets)
    for s, stage in enumerate(spec.stages):
        out += _kto_dataset_problems(f"spec.stages[{s}].datasets", stage.objective, stage.datasets)
    return out


def check_node_pool(spec: FineTuneJobSpec, cfg: OperatorConfig) -> list[Problem]:
    name = spec.resources.nodePool or cfg.defaultNodePool
    if name not in cfg.nodePools:
        return [Problem("UnknownNodePool",
                        f"spec.resources.nodePool: unknown node pool {name!r} (known: {', '.join(sorted(cfg.nodePools))})")]
    return []


def check_gpus_fit_pool(spec: FineTuneJobSpec, cfg: OperatorConfig) -> list[Problem]:
    name = spec.resources.nodePool or cfg.defaultNodePool
    pool = cfg.nodePools.get(name)
    gpus = spec.resources.gpusPerWorker
    if pool is None or gpus == 0:
        return []
    if pool.gpusPerNode == 0:
        return [Problem("GPUsNotAvailable",
                        f"spec.resources.gpusPerWorker: node pool {name!r} has no GPUs; set gpusPerWorker: 0 or a GPU pool")]
    if gpus > pool.gpusPerNode:
        return [Problem("GPUsNotAvailable",
                        f"spec.resources.gpusPerWorker: {gpus} GPUs per pod, but nodes of pool {name!r} have {pool.gpusPerNode}")]
    return []


def check_qlora_needs_gpus(spec: FineTuneJobSpec, cfg: OperatorConfig) -> list[Problem]:
    if spec.method.type == "qlora" and spec.resources.gpusPerWorker == 0:
        return [Problem("InvalidSpec", "spec.method.type: qlora needs spec.resources.gpusPerWorker > 0")]
    return []


def check_method_settings(spec: FineTuneJobSpec, cfg: OperatorConfig) -> list[Problem]:
    m, out = spec.method, []
    if m.lora is not None and m.type not in ("lora", "qlora", "dora"):
        out.append(Problem("InvalidSpec", f"spec.method.lora: only allowed with method.type lora, qlora or dora, not {m.type}"))
    if m.virtualTokens is not None and m.type not in ("prefix", "prompt"):
        out.append(Problem("InvalidSpec", f"spec.method.virtualTokens: only allowed with method.type prefix or prompt, not {m.type}"))
    if m.freezeLayers is not None and m.type != "full":
        out.append(Problem("InvalidSpec", f"spec.method.freezeLayers: only allowed with method.type full, not {m.type}"))
    if m.full is not None and m.type != "full":
        out.append(Problem("InvalidSpec", f"spec.method.full: only allowed with method.type full, not {m.type}"))
    if m.full is not None and m.full.unfreeze is not None and (
            (m.full.unfreeze.everySteps is None) == (m.full.unfreeze.everyEpochs is None)):
        out.append(Problem("InvalidSpec", "spec.method.full.unfreeze: set exactly one of everySteps and everyEpochs"))
    if m.full is not None and m.full.unfreeze is not None and m.freezeLayers is not None:
        out.append(Problem("InvalidSpec", "spec.method.full.unfreeze: replaces method.freezeLayers (set unfreeze.floor)"))
    return out


def check_distributed_settings(spec: FineTuneJobSpec, cfg: OperatorConfig) -> list[Problem]:
    d, out = spec.distributed, []
    if d.zeroStage is not None and d.engine != "deepspeed":
        out.append(Problem("InvalidSpec", "spec.distributed.zeroStage: only allowed with engine deepspeed"))
    if d.offload != "none" and d.engine != "deepspeed":
        out.append(Problem("InvalidSpec", "spec.distributed.offload: needs engine deepspeed"))
    elif d.offload != "none" and d.zeroStage is not None and d.zeroStage < 2:
        out.append(Problem("InvalidSpec", "spec.distributed.offload: needs zeroStage 2 or 3"))
    return out


def check_other_cross_field_rules(spec: FineTuneJobSpec, cfg: OperatorConfig) -> list[Problem]:
    out = []
    if spec.objective in ("dpo", "kto") and spec.preprocessing.packing:
        out.append(Problem("InvalidSpec", f"spec.preprocessing.packing: not allowed with objective {spec.objective}"))
    if spec.method.type in ("prefix", "prompt") and spec.preprocessing.packing:
        out.append(Problem("InvalidSpec", f"spec.preprocessing.packing: not allowed with method {spec.method.type} "
                                          "(virtual tokens belong to one row)"))
    if spec.evaluation.maxPerplexityRatio is not None and not spec.evaluation.compareToBase:
        out.append(Problem("InvalidSpec", "spec.evaluation.maxPerplexityRatio: needs evaluation.compareToBase true"))
    if spec.validation.uri and spec.validation.splitRatio:
        out.append(Problem("InvalidSpec", "spec.validation: set either uri or splitRatio, not both"))
    return out


def check_content_filters(spec: FineTuneJobSpec, cfg: OperatorConfig) -> list[Problem]:
    return [Problem("InvalidSpec", f"spec.preprocessing.{p}") for p in spec.preprocessing.content_filter_problems()]


def check_evaluation_tasks(spec: FineTuneJobSpec, cfg: OperatorConfig) -> list[Problem]:
    return [Problem("InvalidSpec", f"spec.evaluation.{p}") for p in spec.evaluation.task_problems()]


def check_image_allowed(spec: FineTuneJobSpec, cfg: OperatorConfig) -> list[Problem]:
    image = spec.image
    if not image:
        return []
    if not image_from(image, cfg.allowedImages):
        allowed = ", ".join(cfg.allowedImages) or "none: only the operator's trainer image"
        return [Problem("ImageNotAllowed", f"spec.image: {image!r} is not from an allowed registry prefix ({allowed})")]
    return check_image_digest(spec, cfg)


def check_image_digest(spec: FineTuneJobSpec, cfg: OperatorConfig) -> list[Problem]:
    """The operator-wide requireImageDigest: a TenantPolicy replaces the allowed registries, not this
    (validate_spec checks it under a policy too; the policy's own requireDigest is its PolicyViolation)."""
    image = spec.image
    if image and cfg.requireImageDigest and not DIGEST.search(image):
        return [Problem("ImageNotAllowed", f"spec.image: {image!r} must be pinned by digest (@sha256:<64 hex>)")]
    return []


def check_priority_class_allowed(spec: FineTuneJobSpec, cfg: OperatorConfig) -> list[Problem]:
    name = spec.runPolicy.priorityClassName
    if name and name not in cfg.allowedPriorityClasses:
        allowed = ", ".join(cfg.allowedPriorityClasses) or "none"
        return [Problem("PriorityClassNotAllowed",
                        f"spec.runPolicy.priorityClassName: {name!r} is not allowed (allowed: {allowed})")]
    return []


def check_resource_bounds(spec: FineTuneJobSpec, cfg: OperatorConfig) -> list[Problem]:
    res, out = spec.resources, []
    for field_name in ("cpu", "memory"):
        if quantity.value(getattr(res, field_name)) <= 0:
            out.append(Problem("InvalidSpec", f"spec.resources.{field_name}: must be greater than 0 (0 would mean no limit)"))
    if quantity.value(res.sharedMemory) <= 0:
        out.append(Problem("InvalidSpec", "spec.resources.sharedMemory: must be greater than 0"))
    elif quantity.value(res.sharedMemory) > quantity.value(cfg.maxSharedMemory):
        out.append(Problem("LimitExceeded", f"spec.resources.sharedMemory: {res.sharedMemory} is above the "
                                            f"operator's limit {cfg.maxSharedMemory}"))
    return out


def check_storage_endpoint(spec: FineTuneJobSpec, cfg: OperatorConfig, facts: Facts) -> list[Problem]:
    """The endpoint against the allowed ones (the policy's, when it names some) and the forbidden
    destinations; an endpoint the tenant's policy does not allow is a PolicyViolation."""
    policy = facts.policy
    out = []
    for p in endpoints.check_endpoint(spec.storage.endpoint, tenancy.effective_config(cfg, policy),
                                      facts.endpoint_addresses, facts.api_server_addresses,
                                      unanswered=facts.endpoint_unanswered):
        if policy is not None and p.reason == "EndpointNotAllowed":
            out.append(Problem(tenancy.POLICY_VIOLATION, f"spec.storage.endpoint: {p.message} "
                                                         f"(TenantPolicy {policy.name}: storage.endpoints)"))
        else:
            out.append(Problem(p.reason, f"spec.storage.endpoint: {p.message}"))
    return out


def check_search(spec: FineTuneJobSpec, cfg: OperatorConfig) -> list[Problem]:
    from finetune_operator.search import space

    return space.problems(spec) if spec.search is not None else []


SPEC_VALIDATORS: list[Callable[[FineTuneJobSpec, OperatorConfig], list[Problem]]] = [
    check_search,
    check_method_settings,
    check_distributed_settings,
    check_other_cross_field_rules,
    check_content_filters,
    check_evaluation_tasks,
    check_evaluate_only,
    check_datasets_or_stages,
    check_adapter_reuse,
    check_unique_stage_names,
    check_dpo_datasets,
    check_kto_datasets,
    check_qlora_needs_gpus,
    check_node_pool,
    check_gpus_fit_pool,
    check_image_allowed,
    check_priority_class_allowed,
    check_resource_bounds,
]


# Checks of operator-wide allow-lists that a TenantPolicy's own lists replace.
REPLACED_BY_POLICY = (check_image_allowed, check_priority_class_allowed)


def validate_spec(raw_spec: dict[str, Any], cfg: OperatorConfig, policy: tenancy.Policy | None = None,
                  run_settings: dict[str, Any] | None = None) -> tuple[FineTuneJobSpec | None, list[Problem]]:
    """Problems of the spec alone (no cluster facts) under the tenant's policy, if any. Returns the
    parsed spec with the policy's defaults filled in (what the run is built from) when it parses; for a
    run that exists, the `run_settings` it was made with instead."""
    spec, problems = parse_or_problems(raw_spec)
    if spec is None:
        return None, problems
    spec = tenancy.with_policy_defaults(spec, policy, cfg)
    if run_settings is not None:
        spec = tenancy.with_run_settings(spec, run_settings)
    effective = tenancy.effective_config(cfg, policy)
    for validator in SPEC_VALIDATORS:
        if policy is None or validator not in REPLACED_BY_POLICY:
            problems.extend(validator(spec, effective))
    if policy is not None:
        problems.extend(check_image_digest(spec, cfg))  # the operator's requirement: no policy lifts it
        problems.extend(tenancy.check_policy(spec, policy))
    else:
        problems.extend(tenancy.check_queue_without_policy(spec, cfg))
        problems.extend(tenancy.check_default_limits(spec, cfg))
    return spec, problems


# ---- facts ---------------------------------------------------------------------------------------


def check_secret(spec: FineTuneJobSpec, facts: Facts) -> list[Problem]:
    """The Secret exists in the job's namespace, was opted in for FineTuneJobs by its owner (a label
    that needs rights on the Secret itself: a principal that may only create FineTuneJobs cannot
    have any Secret copied), and holds non-empty credentials (empty ones would let the AWS SDK fall
    back to the node's own identity)."""
    name = spec.credentials.secretName
    if facts.secret_found is False:
        return [Problem("SecretNotFound", f"spec.credentials.secretName: Secret {name!r} not found in the job's namespace")]
    if facts.secret_found:
        if not facts.secret_opted_in:
            return [Problem("SecretNotOptedIn",
                            f"spec.credentials.secretName: Secret {name!r} is not labelled "
                            f"{CREDENTIALS_OPT_IN_LABEL}=true; label it to let FineTuneJobs use it")]
        missing = [k for k in CREDENTIAL_KEYS if k not in facts.secret_keys]
        if missing:
            return [Problem("SecretKeysMissing",
                            f"spec.credentials.secretName: Secret {name!r} lacks key(s) {', '.join(missing)}")]
        blank = sorted(facts.secret_blank_keys)
        if blank:
            return [Problem("SecretValueEmpty",
                            f"spec.credentials.secretName: Secret {name!r} has empty value(s) for {', '.join(blank)}")]
    return []


SECRET_REASONS = {"SecretNotFound", "SecretNotOptedIn", "SecretKeysMissing", "SecretValueEmpty"}


def s3_uris_to_check(spec: FineTuneJobSpec) -> dict[str, str]:
    """Inputs that must exist before a run starts: field path -> s3 URI (a key or a prefix)."""
    uris = {"spec.model.uri": spec.model.uri}
    for i, d in enumerate(spec.datasets):
        uris[f"spec.datasets[{i}].uri"] = d.uri
    if spec.validation.uri:
        uris["spec.validation.uri"] = spec.validation.uri
    for s, stage in enumerate(spec.stages):
        for i, d in enumerate(stage.datasets):
            uris[f"spec.stages[{s}].datasets[{i}].uri"] = d.uri
    if spec.method.adapter is not None:
        uris["spec.method.adapter.uri"] = spec.method.adapter.uri
    if spec.evaluation.candidateModel is not None:
        uris["spec.evaluation.candidateModel.uri"] = spec.evaluation.candidateModel.uri
    if spec.output.combine is not None:
        for i, a in enumerate(spec.output.combine.adapters):
            uris[f"spec.output.combine.adapters[{i}].uri"] = a.uri
    for i, f in enumerate(spec.preprocessing.contentFilters):
        for name in ("termsUri", "modelUri"):
            if getattr(f, name):
                uris[f"spec.preprocessing.contentFilters[{i}].{name}"] = getattr(f, name)
    for i, task in enumerate(spec.evaluation.tasks):
        uris[f"spec.evaluation.tasks[{i}].uri"] = task.uri
    if spec.evaluation.general is not None:
        uris["spec.evaluation.general.uri"] = spec.evaluation.general.uri
    return uris


def check_s3_inputs(spec: FineTuneJobSpec, facts: Facts) -> list[Problem]:
    out = []
    for path, uri in s3_uris_to_check(spec).items():
        check = facts.s3.get(path)
        if check is None:
            continue
        if check.exists is False and check.error:
            out.append(Problem("S3AccessDenied", f"{path}: cannot read {uri} with the job's credentials: {check.error}"))
        elif check.exists is False:
            out.append(Problem("S3ObjectNotFound", f"{path}: nothing at {uri}"))
        elif check.exists is None:
            out.append(Problem("S3Unreachable", f"{path}: cannot check {uri}: {check.error}"))
    return out


TRANSIENT_REASONS = {"S3Unreachable", "EndpointUnresolvable"}


def validate(raw_spec: dict[str, Any], cfg: OperatorConfig, facts: Facts) -> tuple[FineTuneJobSpec | None, list[Problem]]:
    """All problems: the tenant's policy, the spec's, then the Secret's, then the S3 inputs' (only when
    the rest is fine)."""
    if facts.policy_problem is not None:
        spec, problems = parse_or_problems(raw_spec)
        if spec is not None and facts.run_settings is not None:
            spec = tenancy.with_run_settings(spec, facts.run_settings)
        return spec, [facts.policy_problem, *problems]
    spec, problems = validate_spec(raw_spec, cfg, facts.policy, facts.run_settings)
    if spec is None:
        return None, problems
    problems.extend(check_storage_endpoint(spec, cfg, facts))
    problems.extend(check_secret(spec, facts))
    if not problems:
        problems.extend(check_s3_inputs(spec, facts))
    return spec, problems
