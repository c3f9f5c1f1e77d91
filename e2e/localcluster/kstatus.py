"""kstatus (sigs.k8s.io/cli-utils pkg/kstatus, as Flux, kpt and Helm 4's --wait use it) on objects,
through the harness in e2e/runtimes/kstatus/ (built by `make cluster-build`)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from collections.abc import Iterable
from pathlib import Path

from . import build


class KstatusNotBuilt(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class Condition:
    type: str
    status: str
    reason: str
    message: str


@dataclasses.dataclass(frozen=True)
class Result:
    """What status.Compute says of one object: status is Current, InProgress, Failed, Terminating
    or Unknown; conditions are the standard ones (Reconciling, Stalled) kstatus would set on it."""

    api_version: str
    kind: str
    namespace: str
    name: str
    status: str
    message: str
    conditions: tuple[Condition, ...]


def binary() -> Path:
    path = build.KSTATUS.binary("kstatus")
    if not path.exists():
        raise KstatusNotBuilt(f"the kstatus harness is not built ({path}): run `make cluster-build` "
                              "(or `python -m e2e.localcluster.build kstatus`)")
    return path


def _result(entry: dict) -> Result:
    if entry.get("error"):
        raise ValueError(f"kstatus could not compute {entry['kind']} {entry['namespace']}/{entry['name']}: "
                         f"{entry['error']}")
    return Result(api_version=entry["apiVersion"], kind=entry["kind"], namespace=entry["namespace"],
                  name=entry["name"], status=entry["status"], message=entry["message"],
                  conditions=tuple(Condition(**c) for c in entry["conditions"]))


def compute(objects: Iterable[dict]) -> list[Result]:
    """kstatus's result for each object (as the API server returns it), in order."""
    completed = subprocess.run([str(binary())], input=json.dumps(list(objects)), capture_output=True, text=True,
                               timeout=60)
    if completed.returncode != 0:
        raise RuntimeError(f"kstatus failed ({completed.returncode}): {completed.stderr}")
    return [_result(entry) for entry in json.loads(completed.stdout)]


def compute_one(obj: dict) -> Result:
    (result,) = compute([obj])
    return result
