"""Shared test data for the operator's unit tests: FineTuneJob objects as the API server stores them."""

from __future__ import annotations

import copy
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

from finetune_operator.api.crd import openapi_schema
from finetune_operator.status import Observation, derive_status

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def apply_schema_defaults(value: Any, schema: dict[str, Any]) -> Any:
    """Structural defaulting as the API server does it: absent fields get their default, recursively."""
    if isinstance(value, dict) and "properties" in schema:
        out = dict(value)
        for name, prop in schema["properties"].items():
            if name not in out and "default" in prop:
                out[name] = copy.deepcopy(prop["default"])
            if name in out:
                out[name] = apply_schema_defaults(out[name], prop)
        return out
    if isinstance(value, list) and "items" in schema:
        return [apply_schema_defaults(v, schema["items"]) for v in value]
    return value


SPEC_SCHEMA = openapi_schema()["properties"]["spec"]


def minimal_spec(**overrides: Any) -> dict[str, Any]:
    spec = {
        "model": {"uri": "s3://models/smollm2-135m/"},
        "datasets": [{"uri": "s3://team-a/data/support.jsonl", "format": "chat"}],
        "output": {"uri": "s3://team-a/models/support-bot/"},
        "credentials": {"secretName": "s3-credentials"},
    }
    spec.update(overrides)
    return spec


def job(spec: dict[str, Any] | None = None, *, name: str = "support-bot", namespace: str = "team-a",
        uid: str = "0b7c6f2e-1111-4222-8333-944455556666", generation: int = 1,
        status: dict[str, Any] | None = None, defaults: bool = True) -> dict[str, Any]:
    """A FineTuneJob as read from the API server (schema defaults applied)."""
    spec = minimal_spec() if spec is None else spec
    obj: dict[str, Any] = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": uid,
            "generation": generation,
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": apply_schema_defaults(spec, SPEC_SCHEMA) if defaults else spec,
    }
    if status is not None:
        obj["status"] = status
    return obj


def seen_earlier(body: dict[str, Any], observation: Observation, seconds: float = 3600,
                 retryable_exit_codes: list[int] | None = None) -> dict[str, Any]:
    """`body` with the status the operator wrote `seconds` before `observation`, seeing the same.

    A running run is then Running since that pass: the stall clock starts when a run turns Running.
    """
    earlier = replace(observation, now=observation.now - timedelta(seconds=seconds))
    return dict(body, status=derive_status(body, earlier, retryable_exit_codes))


def example_documents() -> list[tuple[str, dict[str, Any]]]:
    """(path under examples/, document) of every example, the tenant setup in examples/tenants/ too."""
    docs = []
    for path in sorted(EXAMPLES.glob("*.yaml")) + sorted(EXAMPLES.glob("tenants/*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.relative_to(EXAMPLES).as_posix(), doc))
    return docs
