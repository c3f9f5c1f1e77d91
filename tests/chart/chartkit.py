"""Helpers of the chart tests: paths, a `helm` runner that renders and parses manifests."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "finetune-operator"
ALL_FEATURES = CHART / "ci" / "all-features-values.yaml"
ARGOCD = REPO / "argocd"
RELEASE_NAMESPACE = "finetune-system"


class Helm:
    def __init__(self, binary: Path):
        self.binary = binary

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([str(self.binary), *args], capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def template(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run("template", "ftop", str(CHART), "--namespace", RELEASE_NAMESPACE, *args, check=check)

    def render(self, *args: str) -> list[dict]:
        return [doc for doc in yaml.safe_load_all(self.template(*args).stdout) if doc]


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict], kind: str) -> dict:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def named(objects: list[dict], kind: str, name_suffix: str) -> dict:
    found = [o for o in by_kind(objects, kind) if o["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind} named *{name_suffix}, found {len(found)}"
    return found[0]
