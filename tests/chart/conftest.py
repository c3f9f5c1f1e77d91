"""Fixtures of the chart tests: the helm and promtool binaries, built from their Go modules and cached by
version."""

from __future__ import annotations

from pathlib import Path

import pytest

from e2e.localcluster import build
from tests.chart.chartkit import Helm


@pytest.fixture(scope="session")
def helm_cli() -> Helm:
    build.build(build.HELM, log=lambda *_: None)
    return Helm(build.HELM.binary("helm"))


@pytest.fixture(scope="session")
def promtool() -> Path:
    binary = build.PROMETHEUS.binary("promtool")
    if not binary.exists():
        pytest.fail(f"promtool is not built ({binary}): run `make cluster-build`")
    return binary
