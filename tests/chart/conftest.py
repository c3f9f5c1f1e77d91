"""Fixtures of the chart tests: the helm binary, built from its Go module and cached by version."""

from __future__ import annotations

import pytest

from e2e.localcluster import build
from tests.chart.chartkit import Helm


@pytest.fixture(scope="session")
def helm_cli() -> Helm:
    build.build(build.HELM, log=lambda *_: None)
    return Helm(build.HELM.binary("helm"))
