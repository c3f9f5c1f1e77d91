"""Kubernetes Events about a FineTuneJob (pure builders) and which transitions deserve one."""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any

from finetune_operator.builders.names import MANAGER
from finetune_operator.status import POD_WAITING_REASONS

NORMAL, WARNING = "Normal", "Warning"

# (condition type, new status) -> (event type, reason used when the condition has none)
NOTABLE = {
    ("Validated", "False"): (WARNING, "ValidationFailed"),
    ("SandboxReady", "True"): (NORMAL, "SandboxReady"),
    ("Running", "True"): (NORMAL, "Running"),
    ("Succeeded", "True"): (NORMAL, "Succeeded"),
    ("Failed", "True"): (WARNING, "Failed"),
    ("Suspended", "True"): (NORMAL, "Suspended"),
    ("UpToDate", "False"): (WARNING, "SpecChangedDuringRun"),
}


WARNING_REASONS = {"ProgressStalled"}  # a notable transition that is bad news despite its condition
# Running=False reasons worth an event of their own: the run waits (its tenant's budget or running-job
# limit, Kueue), was preempted, or its pods cannot be placed or started (an image that cannot be pulled,
# a crash loop, a container creating for too long).
NOTABLE_WAITS = {"BudgetExhausted": WARNING, "RunningJobLimit": NORMAL, "Queued": NORMAL, "Preempted": WARNING,
                 "Unschedulable": WARNING, **{reason: WARNING for reason in POD_WAITING_REASONS}}
# The kubelet alternates between a pull error and the back-off after it: one wait, one event.
SAME_WAIT = {"ImagePullBackOff": "ErrImagePull"}


def _state(condition: dict[str, Any]) -> tuple[Any, Any]:
    reason = condition.get("reason")
    return condition.get("status"), SAME_WAIT.get(reason, reason)


def transition_events(old_status: dict[str, Any], new_status: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(type, reason, message) for every notable condition that changed status or reason."""
    before = {c["type"]: _state(c) for c in old_status.get("conditions") or []}
    out = []
    for c in new_status.get("conditions") or []:
        notable = NOTABLE.get((c["type"], c["status"]))
        if notable is None and c["type"] == "Running" and c.get("reason") in NOTABLE_WAITS:
            notable = (NOTABLE_WAITS[c["reason"]], c["reason"])
        if notable and before.get(c["type"]) != _state(c):
            event_type, default_reason = notable
            if c.get("reason") in WARNING_REASONS:
                event_type = WARNING
            out.append((event_type, c.get("reason") or default_reason, c.get("message") or c["type"]))
    return out


def search_events(old_status: dict[str, Any], new_status: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Events of a search's trials: started, pruned, finished or failed; the best trial promoted."""
    if old_status.get("runId") != new_status.get("runId"):
        old_status = {}
    old_search, new_search = old_status.get("search") or {}, new_status.get("search") or {}
    before = {t["number"]: t.get("phase") for t in old_search.get("trials") or []}
    metric = new_search.get("metric", "")
    out = []
    for trial in new_search.get("trials") or []:
        number, phase = trial["number"], trial.get("phase")
        params = ", ".join(f"{k}={v:g}" for k, v in sorted((trial.get("parameters") or {}).items()))
        if number not in before:
            out.append((NORMAL, "TrialStarted", f"trial t{number} started: {params}"))
        if phase == before.get(number) or phase in ("Pending", "Running"):
            continue
        if phase == "Pruned":
            out.append((NORMAL, "TrialPruned", f"trial t{number}: {trial.get('message', '')}"))
        elif phase == "Succeeded":
            out.append((NORMAL, "TrialSucceeded", f"trial t{number} finished: {metric} {trial.get('value', 0):.4g} ({params})"))
        elif phase == "Failed":
            out.append((WARNING, "TrialFailed", f"trial t{number} failed: {trial.get('message', '')}"))
    if new_search.get("promoted") and not old_search.get("promoted") and new_search.get("best"):
        best = new_search["best"]
        out.append((NORMAL, "BestTrialPromoted", f"trial t{best['number']} ({metric} {best['value']:.4g}) promoted; "
                                                 f"report: {new_search.get('reportUri', '')}"))
    return out


def event(job: dict[str, Any], event_type: str, reason: str, message: str, now: datetime,
          instance: str = MANAGER) -> dict[str, Any]:
    """A core/v1 Event on the FineTuneJob (kubectl describe ftj shows it); `instance` names the operator
    replica that reported it (its pod)."""
    meta = job["metadata"]
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    digest = hashlib.sha256(f"{meta.get('uid')}/{reason}/{message}/{now.isoformat()}".encode()).hexdigest()[:10]
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{meta['name'][:200]}.{digest}", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": job.get("apiVersion", "finetune.dev/v1alpha1"),
            "kind": job.get("kind", "FineTuneJob"),
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta.get("uid", ""),
            "resourceVersion": meta.get("resourceVersion", ""),
        },
        "type": event_type,
        "reason": reason[:128],
        "message": message[:1024],
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
        "source": {"component": MANAGER},
        "reportingComponent": MANAGER,
        "reportingInstance": instance[:128],
    }
