"""One run of a FineTuneJob: the rendered TrainerConfig and the PyTorchJob (pure builders).

Restarts: both replica types use restartPolicy ExitCode. The training-operator then restarts a
pod whose trainer exited with 128-255 (signals, preemption: retryable) and fails the job on 1-127
(permanent: bad data, bad config, the evaluation gate). The trainer resumes from the newest
complete checkpoint after a restart. runPolicy.backoffLimit bounds the restarts.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from finetune_operator import tenancy
from finetune_operator.builders import names as n
from finetune_operator.builders.sandbox import object_meta, resolve_pool, s3_endpoint, sandbox_name
from finetune_operator.config import OperatorConfig
from finetune_trainer.config import JobIdentity, Runtime, Storage, TrainerConfig

MASTER_PORT = 23456
SHUTDOWN_MARGIN_SECONDS = 5
CONTAINER_NAME = "pytorch"  # the name the training-operator looks for
# The FineTuneJob's full name on its trainer pods (the label finetune.dev/job-name is cut to 63
# characters): the PodMonitor's relabelings make it the `name` label of the trainer's series.
ANNOTATION_JOB_NAME = "finetune.dev/job-name"


def trainer_config(job: n.JobRef, cfg: OperatorConfig, enforce_gates: bool = True) -> TrainerConfig:
    spec = job.spec
    return TrainerConfig(
        job=JobIdentity(namespace=job.namespace, name=job.name, uid=job.uid, runId=spec.runId),
        model=spec.model,
        datasets=spec.datasets,
        validation=spec.validation,
        preprocessing=spec.preprocessing,
        method=spec.method,
        objective=spec.objective,
        hyperparameters=spec.hyperparameters,
        stages=spec.stages,
        distributed=spec.distributed,
        checkpoint=spec.checkpoint,
        output=spec.output,
        evaluation=spec.evaluation,
        storage=Storage(endpoint=s3_endpoint(job, cfg), region=spec.storage.region),
        runtime=Runtime(metricsPort=cfg.trainerMetricsPort, progressIntervalSeconds=cfg.progressIntervalSeconds,
                        enforceGates=enforce_gates),
    )


@dataclasses.dataclass(frozen=True)
class Trial:
    """One trial of a search: its number and hyperparameters."""

    number: int
    parameters: dict[str, float | int]


def _labels(job: n.JobRef, trial: Trial | None) -> dict[str, str]:
    labels = n.run_labels(job)
    if trial is not None:
        labels[n.LABEL_TRIAL] = str(trial.number)
    return labels


def _run_meta(job: n.JobRef, cfg: OperatorConfig, name: str, trial: Trial | None = None) -> dict[str, Any]:
    meta = object_meta(job, cfg, name)
    meta["labels"] = _labels(job, trial)
    meta["annotations"] = {**meta["annotations"], n.ANNOTATION_SPEC_HASH: n.spec_hash(job.raw_spec)}
    if trial is not None:
        meta["annotations"][n.ANNOTATION_TRIAL_PARAMETERS] = json.dumps(trial.parameters, sort_keys=True)
    return meta


def _configmap_name(job: n.JobRef, trial: Trial | None) -> str:
    run_id = job.spec.runId
    return n.configmap_name(run_id) if trial is None else n.trial_configmap_name(run_id, trial.number)


def _pytorchjob_name(job: n.JobRef, trial: Trial | None) -> str:
    run_id = job.spec.runId
    return n.pytorchjob_name(run_id) if trial is None else n.trial_pytorchjob_name(run_id, trial.number)


def trial_job(job: n.JobRef, trial: Trial) -> n.JobRef:
    """The job as one trial runs it: the trial's hyperparameters, its own output and checkpoint prefixes,
    no search. Its gates are evaluated but do not fail it (config_map): the search gates the promoted
    best trial by them."""
    from finetune_operator.search import space

    spec = space.trial_spec(job.spec, trial.parameters)
    spec = spec.model_copy(update={
        "output": spec.output.model_copy(update={"uri": n.trial_output_uri(spec.output.uri, trial.number)}),
        "checkpoint": spec.checkpoint.model_copy(
            update={"uri": n.trial_checkpoint_uri(spec.checkpoint.uri, trial.number)}),
        "search": None,
    })
    return dataclasses.replace(job, spec=spec)


def config_map(job: n.JobRef, cfg: OperatorConfig, trial: Trial | None = None) -> dict[str, Any]:
    rendered = trial_job(job, trial) if trial is not None else job
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _run_meta(job, cfg, _configmap_name(job, trial), trial),
        "data": {n.CONFIG_KEY: trainer_config(rendered, cfg, enforce_gates=trial is None).to_json()},
    }


def procs_per_pod(job: n.JobRef) -> int:
    return max(job.spec.resources.gpusPerWorker, 1)


def _container(job: n.JobRef, cfg: OperatorConfig, *, serves_metrics: bool) -> dict[str, Any]:
    res = job.spec.resources
    _, pool = resolve_pool(job, cfg)
    resources: dict[str, Any] = {"cpu": str(res.cpu), "memory": str(res.memory),
                                 "ephemeral-storage": cfg.scratchSize}
    if res.gpusPerWorker:
        resources[pool.gpuResource] = str(res.gpusPerWorker)
    return {
        "name": CONTAINER_NAME,
        "image": job.spec.image or cfg.trainerImage,
        "imagePullPolicy": cfg.tenantImagePullPolicy if job.spec.image else cfg.imagePullPolicy,
        # The training-operator sets PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT,
        # which torchrun reads; the launcher runs torchrun (one trainer process per GPU, one on CPU)
        # and exits with the trainer's own exit code, so the ExitCode restart policy sees it.
        "command": ["python", "-m", "finetune_trainer.launch", "--config", f"{n.CONFIG_DIR}/{n.CONFIG_KEY}"],
        "env": [
            {"name": "HOME", "value": "/tmp"},
            {"name": "HF_HOME", "value": "/tmp/hf"},
            {"name": "XDG_CACHE_HOME", "value": "/tmp/cache"},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            {"name": "AWS_DEFAULT_REGION", "value": job.spec.storage.region},
            # Only the tenant's credentials: never the instance metadata service's.
            {"name": "AWS_EC2_METADATA_DISABLED", "value": "true"},
            {"name": "FINETUNE_NPROC_PER_NODE", "value": str(procs_per_pod(job))},
            {"name": "FINETUNE_TRAINER_METRICS_PORT", "value": str(cfg.trainerMetricsPort)},
            # torchrun gives the ranks 30 s after SIGTERM, then SIGKILL: a checkpoint on preemption
            # gets the pod's grace period instead, less a margin for torchrun and the launcher to exit.
            {"name": "TORCH_ELASTIC_SHUTDOWN_TIMEOUT",
             "value": str(max(job.spec.checkpoint.preemptionGraceSeconds - SHUTDOWN_MARGIN_SECONDS, 1))},
        ],
        "envFrom": [{"secretRef": {"name": n.CREDENTIALS_SECRET}}],
        # Only rank 0 serves the trainer's metrics, and rank 0 runs in the Master: a `metrics` port on
        # the workers would be a scrape target that is always down. The Master's launcher holds the
        # port from the container's start (rank 0 starts only after the rendezvous) and relays rank 0.
        "ports": [
            {"name": "pytorchjob-port", "containerPort": MASTER_PORT, "protocol": "TCP"},
            *([{"name": "metrics", "containerPort": cfg.trainerMetricsPort, "protocol": "TCP"}] if serves_metrics else []),
        ],
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": "trainer-config", "mountPath": n.CONFIG_DIR, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "scratch", "mountPath": "/tmp"},
        ],
    }


def _pod_template(job: n.JobRef, cfg: OperatorConfig, *, master: bool, trial: Trial | None) -> dict[str, Any]:
    _, pool = resolve_pool(job, cfg)
    pod: dict[str, Any] = {
        # On preemption or eviction the trainer finishes its step and saves a checkpoint in this time.
        "terminationGracePeriodSeconds": job.spec.checkpoint.preemptionGraceSeconds,
        "serviceAccountName": n.SERVICE_ACCOUNT,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": cfg.runAsUser,
            "runAsGroup": cfg.runAsUser,
            "fsGroup": cfg.runAsUser,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_container(job, cfg, serves_metrics=master)],
        "volumes": [
            {"name": "trainer-config", "configMap": {"name": _configmap_name(job, trial)}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": str(job.spec.resources.sharedMemory)}},
            {"name": "scratch", "emptyDir": {"sizeLimit": cfg.scratchSize}},
        ],
    }
    if pool.nodeSelector:
        pod["nodeSelector"] = dict(pool.nodeSelector)
    if pool.tolerations:
        pod["tolerations"] = [dict(t) for t in pool.tolerations]
    if job.spec.runPolicy.priorityClassName:
        pod["priorityClassName"] = job.spec.runPolicy.priorityClassName
    return {"metadata": {"labels": _labels(job, trial), "annotations": {ANNOTATION_JOB_NAME: job.name}}, "spec": pod}


def _replica(job: n.JobRef, cfg: OperatorConfig, replicas: int, *, master: bool, trial: Trial | None) -> dict[str, Any]:
    return {"replicas": replicas, "restartPolicy": "ExitCode",
            "template": _pod_template(job, cfg, master=master, trial=trial)}


def owns_suspend(job: n.JobRef) -> bool:
    """Whether the operator sets runPolicy.suspend. With a Kueue queue the field is Kueue's: it
    suspends the job until admitted, to preempt it, and resumes it; the user's runPolicy.suspend
    deactivates the run's Workload instead (kueue.activation_patch)."""
    return not job.spec.runPolicy.queueName


def suspended_for_creation(ptj: dict[str, Any]) -> dict[str, Any]:
    """A queued PyTorchJob as first created: suspended, so that no pod starts before Kueue admits it.
    It is created (not applied) this way: the suspend field then belongs to no apply of the operator,
    and Kueue takes it over when it admits, evicts or preempts the run."""
    run_policy = {**ptj["spec"]["runPolicy"], "suspend": True}
    return {**ptj, "spec": {**ptj["spec"], "runPolicy": run_policy}}


def recorded_settings(ptj: dict[str, Any]) -> dict[str, Any]:
    """The settings (tenancy.RUN_SETTINGS) a run's PyTorchJob was made with: its annotation or, on a
    PyTorchJob made before the annotation existed, what the object itself says (not its node pool)."""
    meta, spec = ptj.get("metadata") or {}, ptj.get("spec") or {}
    try:
        recorded = json.loads((meta.get("annotations") or {}).get(n.ANNOTATION_RUN_SETTINGS) or "null")
    except ValueError:
        recorded = None
    if not isinstance(recorded, dict):
        master = (((spec.get("pytorchReplicaSpecs") or {}).get("Master") or {}).get("template") or {}).get("spec") or {}
        recorded = {"queueName": (meta.get("labels") or {}).get(n.LABEL_KUEUE_QUEUE, ""),
                    "priorityClassName": master.get("priorityClassName", ""),
                    "activeDeadlineSeconds": (spec.get("runPolicy") or {}).get("activeDeadlineSeconds", 0)}
    return {k: v for k, v in recorded.items()
            if k in tenancy.RUN_SETTINGS and type(v) is tenancy.RUN_SETTINGS[k]}


def pytorch_job(job: n.JobRef, cfg: OperatorConfig, trial: Trial | None = None) -> dict[str, Any]:
    spec = job.spec
    meta = _run_meta(job, cfg, _pytorchjob_name(job, trial), trial)
    meta["annotations"][n.ANNOTATION_RUN_SETTINGS] = json.dumps(tenancy.run_settings(spec, cfg), sort_keys=True)
    if spec.runPolicy.queueName:
        meta["labels"][n.LABEL_KUEUE_QUEUE] = spec.runPolicy.queueName
    run_policy: dict[str, Any] = {
        "backoffLimit": spec.runPolicy.backoffLimit,
        "cleanPodPolicy": "None",  # keep finished pods for their logs; the sandbox goes as a whole
    }
    if owns_suspend(job):
        run_policy["suspend"] = spec.runPolicy.suspend
    if spec.runPolicy.activeDeadlineSeconds:
        run_policy["activeDeadlineSeconds"] = spec.runPolicy.activeDeadlineSeconds
    replicas: dict[str, Any] = {"Master": _replica(job, cfg, 1, master=True, trial=trial)}
    if spec.resources.workers > 1:
        replicas["Worker"] = _replica(job, cfg, spec.resources.workers - 1, master=False, trial=trial)
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": meta,
        "spec": {
            "runPolicy": run_policy,
            "nprocPerNode": str(procs_per_pod(job)),
            "pytorchReplicaSpecs": replicas,
        },
    }


def run_objects(job: n.JobRef, cfg: OperatorConfig, trial: Trial | None = None) -> list[dict[str, Any]]:
    """The run (or one trial of a search), in apply order: its config, then the PyTorchJob that mounts it."""
    return [config_map(job, cfg, trial), pytorch_job(job, cfg, trial)]


__all__ = ["config_map", "pytorch_job", "recorded_settings", "run_objects", "sandbox_name", "trainer_config"]
