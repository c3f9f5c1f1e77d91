"""What Kueue says about a queued run, read from its Workload (pure functions).

Kueue makes one Workload per PyTorchJob (owned by it) in the sandbox. While the run waits, the
Workload's QuotaReserved condition carries Kueue's reason and message ("couldn't assign flavors to
pod set master: insufficient quota for nvidia.com/gpu in flavor a100 ..."); a preempted run's
Workload is Evicted with reason Preempted and counts its evictions in status.schedulingStats. Where
Kueue serves its visibility API, a pending Workload's position in its ClusterQueue comes from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finetune_operator.builders import names as n


@dataclass(frozen=True)
class QueueState:
    workload: str
    cluster_queue: str
    admitted: bool
    reason: str  # Kueue's reason for the current state (Pending, QuotaReserved, Preempted, ...)
    message: str
    preemptions: int
    evicted_by_preemption: bool  # evicted by preemption and not admitted again yet
    workloads_ahead: int | None = None  # in the ClusterQueue, from the visibility API; None: not known


def workloads_ahead(summary: dict[str, Any], workload: str) -> int | None:
    """How many Workloads are ahead of `workload` in its ClusterQueue, from the visibility API's
    PendingWorkloadsSummary of its LocalQueue (positionInClusterQueue counts from 0); None when it is
    not listed (admitted meanwhile, or not in Kueue's queue yet)."""
    for item in summary.get("items") or []:
        if isinstance(item, dict) and (item.get("metadata") or {}).get("name") == workload:
            position = item.get("positionInClusterQueue")
            return position if isinstance(position, int) and not isinstance(position, bool) and position >= 0 else None
    return None


def describe_wait(queue: QueueState) -> str:
    """'Pending, 2 workloads ahead' for the Queued condition's message."""
    if queue.workloads_ahead is None:
        return queue.reason
    ahead = ("next in line" if queue.workloads_ahead == 0 else
             f"{queue.workloads_ahead} workload{'s' if queue.workloads_ahead != 1 else ''} ahead")
    return f"{queue.reason}, {ahead}"


def _condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("type") == type_), None)


def _true(obj: dict[str, Any], type_: str) -> bool:
    return (_condition(obj, type_) or {}).get("status") == "True"


def workload_of(workloads: list[dict[str, Any]], ptj: dict[str, Any] | None) -> dict[str, Any] | None:
    """The Workload Kueue made for this very PyTorchJob (its owner reference carries the uid)."""
    if ptj is None:
        return None
    uid = ptj["metadata"].get("uid")
    for workload in workloads:
        if any(ref.get("uid") == uid for ref in workload["metadata"].get("ownerReferences") or []):
            return workload
    return None


def preemptions(workload: dict[str, Any]) -> int:
    stats = (workload.get("status") or {}).get("schedulingStats") or {}
    return sum(int(e.get("count") or 0) for e in stats.get("evictions") or [] if e.get("reason") == "Preempted")


def queue_state(workload: dict[str, Any], cluster_queue: str) -> QueueState:
    admitted = _true(workload, "Admitted")
    evicted = _condition(workload, "Evicted") or {}
    reserved = _condition(workload, "QuotaReserved") or {}
    evicted_by_preemption = not admitted and evicted.get("status") == "True" and evicted.get("reason") == "Preempted"
    if evicted_by_preemption:
        reason, message = "Preempted", evicted.get("message") or "preempted"
    elif admitted:
        reason, message = "Admitted", (_condition(workload, "Admitted") or {}).get("message") or "admitted"
    else:
        reason = reserved.get("reason") or "Pending"
        message = reserved.get("message") or "waiting for Kueue to consider the workload"
    return QueueState(workload=workload["metadata"]["name"], cluster_queue=cluster_queue, admitted=admitted,
                      reason=reason, message=message, preemptions=preemptions(workload),
                      evicted_by_preemption=evicted_by_preemption)


def freshness_patch(obj: dict[str, Any], step: int | None, time: str | None) -> dict[str, Any] | None:
    """A merge patch that publishes the newest checkpoint (step and time) in the object's annotations,
    or None when they already say so (or there is no checkpoint yet)."""
    if step is None:
        return None
    want = {n.ANNOTATION_CHECKPOINT_STEP: str(step), n.ANNOTATION_CHECKPOINT_TIME: time or ""}
    have = obj["metadata"].get("annotations") or {}
    if all(have.get(k) == v for k, v in want.items()):
        return None
    return {"metadata": {"annotations": want}}


def activation_patch(workload: dict[str, Any], active: bool) -> dict[str, Any] | None:
    """A merge patch that (de)activates a Workload, or None when it already is. A queued run is
    suspended by its user this way: Kueue evicts an inactive Workload (its job's pods go, the run
    checkpoints) and queues it again once active; suspending the job itself would be undone by Kueue."""
    if bool((workload.get("spec") or {}).get("active", True)) == active:
        return None
    return {"spec": {"active": active}}
