"""Structured log lines (one JSON object per line on stdout, rank 0 only): what `kubectl logs` shows
and what tests read."""

from __future__ import annotations

import json
import sys
import time

_enabled = True


def enable(on: bool) -> None:
    global _enabled
    _enabled = on


def emit(event: str, **fields) -> None:
    if _enabled:
        print(json.dumps({"event": event, "time": round(time.time(), 3), **fields}, default=str), file=sys.stdout,
              flush=True)
