"""Where the local cluster keeps its state (per checkout) and its build cache (per machine)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def cache_dir() -> Path:
    """Built binaries, keyed by version; shared by every checkout on the machine."""
    explicit = os.environ.get("FTO_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "finetune-operator"


def cluster_dir() -> Path:
    """State of the running cluster: kubeconfig, certificates, logs, pids, data."""
    return Path(os.environ.get("FTO_CLUSTER_DIR", REPO_ROOT / ".cluster"))
