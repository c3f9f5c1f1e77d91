"""Deterministic names, labels and the spec hash of a FineTuneJob's objects."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from finetune_operator.api.types import FineTuneJobSpec, parse_spec

MANAGER = "finetune-operator"
FINALIZER = "finetune.dev/cleanup"  # kopf's, on FineTuneJobs and TenantPolicies
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_TENANT = "finetune.dev/tenant"
LABEL_JOB_NAME = "finetune.dev/job-name"
LABEL_JOB_UID = "finetune.dev/job-uid"
LABEL_RUN_ID = "finetune.dev/run-id"
LABEL_TRIAL = "finetune.dev/trial"  # the trial number of a search's run
ANNOTATION_TRIAL_PARAMETERS = "finetune.dev/trial-parameters"  # JSON: the trial's hyperparameters
ANNOTATION_SPEC_HASH = "finetune.dev/spec-hash"
# JSON on a run's PyTorchJob: what its TenantPolicy (or the operator's configuration) filled in when
# the run was made (tenancy.RUN_SETTINGS); the run keeps it whatever the policy says later.
ANNOTATION_RUN_SETTINGS = "finetune.dev/run-settings"
ANNOTATION_JOB = "finetune.dev/job"
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
# The freshness of a run's newest checkpoint, on its PyTorchJob and Kueue Workload: what a queueing
# system (or an admin) reads to prefer, among preemption victims, the runs that lose the least work.
ANNOTATION_CHECKPOINT_STEP = "finetune.dev/checkpoint-step"
ANNOTATION_CHECKPOINT_TIME = "finetune.dev/checkpoint-time"

SERVICE_ACCOUNT = "trainer"
CREDENTIALS_SECRET = "s3-credentials"
CONFIG_KEY = "trainer-config.json"
CONFIG_DIR = "/etc/finetune"
CREDENTIAL_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
# A Secret may be copied into sandboxes only when it carries this label with the value "true".
CREDENTIALS_OPT_IN_LABEL = "finetune.dev/credentials"
OPTIONAL_CREDENTIAL_KEYS = ("AWS_SESSION_TOKEN",)

MAX_NAME = 63


@dataclass(frozen=True)
class JobRef:
    """The parts of a FineTuneJob object the builders need, with the spec parsed."""

    namespace: str
    name: str
    uid: str
    generation: int
    spec: FineTuneJobSpec
    raw_spec: dict[str, Any]
    sandbox_attempt: int = 0  # which of the job's sandbox names it has (sandbox_candidates)

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> "JobRef":
        meta = body["metadata"]
        raw = dict(body.get("spec") or {})
        return cls(
            namespace=meta["namespace"],
            name=meta["name"],
            uid=meta.get("uid", ""),
            generation=int(meta.get("generation") or 0),
            spec=parse_spec(raw),
            raw_spec=raw,
        )


def _short_hash(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def dns_label(text: str) -> str:
    return re.sub(r"[^a-z0-9-]", "-", text.lower())


SANDBOX_ID_LENGTH = 10
SANDBOX_ATTEMPTS = 3


def sandbox_namespace(prefix: str, tenant: str, name: str, uid: str, attempt: int = 0) -> str:
    """`<prefix>-<tenant>-<name>-<id>`, the readable part cut to fit 63 characters. The id (40 bits of
    a hash of the job's uid) makes the name unique per job: two tenants whose names join to the same
    string, or a job deleted and made again under its name, never share a sandbox. Should a namespace
    of that name be someone else's anyway (a squatter, a hash collision), the job's next attempt hashes
    the uid with the attempt's number."""
    suffix = _short_hash(uid if attempt == 0 else f"{uid}/{attempt}", SANDBOX_ID_LENGTH)
    readable = dns_label(f"{prefix}-{tenant}-{name}")[: MAX_NAME - SANDBOX_ID_LENGTH - 1].rstrip("-")
    return f"{readable}-{suffix}"


def sandbox_of(prefix: str, meta: dict[str, Any], attempt: int = 0) -> str:
    """The sandbox of the FineTuneJob with this metadata (at `attempt`: see sandbox_candidates)."""
    return sandbox_namespace(prefix, meta["namespace"], meta["name"], meta.get("uid", ""), attempt)


def sandbox_candidates(prefix: str, meta: dict[str, Any]) -> list[str]:
    """The names the job's sandbox may have, in the order they are tried: the first that is absent or the
    job's own (its uid label) is its sandbox; one that is someone else's is never adopted."""
    return [sandbox_of(prefix, meta, attempt) for attempt in range(SANDBOX_ATTEMPTS)]


def pytorchjob_name(run_id: str) -> str:
    return f"train-{run_id}"


def configmap_name(run_id: str) -> str:
    return f"trainer-config-{run_id}"


def trial_suffix(number: int) -> str:
    return f"t{number}"


def trial_pytorchjob_name(run_id: str, number: int) -> str:
    return f"{pytorchjob_name(run_id)}-{trial_suffix(number)}"


def trial_configmap_name(run_id: str, number: int) -> str:
    return f"{configmap_name(run_id)}-{trial_suffix(number)}"


def trial_output_uri(output_uri: str, number: int) -> str:
    """Where a trial writes its outputs, documents and (without checkpoint.uri) checkpoints."""
    return f"{output_uri.rstrip('/')}/trials/{trial_suffix(number)}/"


def trial_checkpoint_uri(checkpoint_uri: str | None, number: int) -> str | None:
    return f"{checkpoint_uri.rstrip('/')}/trials/{trial_suffix(number)}/" if checkpoint_uri else None


def job_labels(job: JobRef) -> dict[str, str]:
    return {
        LABEL_MANAGED_BY: MANAGER,
        LABEL_TENANT: job.namespace,
        LABEL_JOB_NAME: dns_label(job.name)[:MAX_NAME].strip("-"),
        LABEL_JOB_UID: job.uid,
    }


def run_labels(job: JobRef) -> dict[str, str]:
    return {**job_labels(job), LABEL_RUN_ID: job.spec.runId}


# Fields that may change during a run and are applied to it; any other spec change needs a new runId.
_LIVE_FIELDS = {"runPolicy": ("suspend", "ttlSecondsAfterFinished")}


def spec_hash(raw_spec: dict[str, Any]) -> str:
    """Hash of everything in the spec that shapes a run (not suspend / ttlSecondsAfterFinished)."""
    spec = json.loads(json.dumps(raw_spec))
    for section, fields in _LIVE_FIELDS.items():
        for field in fields:
            (spec.get(section) or {}).pop(field, None)
    return _short_hash(json.dumps(spec, sort_keys=True, separators=(",", ":")), 16)
