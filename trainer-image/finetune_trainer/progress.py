"""Progress of a run: progress.json in S3 every few seconds and Prometheus metrics (rank 0 only; metrics.py)."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from .checkpoint import now
from .config import MAX_EVAL_HISTORY, CheckpointRecord, EvalPoint, Progress
from .metrics import Metrics, metrics_port  # noqa: F401 (metrics_port: run.py imports it from here)
from .storage import Storage

log = logging.getLogger(__name__)


class Throughput:
    """Tokens per second over a sliding window of recent optimizer steps."""

    def __init__(self, window: int = 20):
        self.samples: deque[tuple[float, int]] = deque(maxlen=window)

    def add(self, tokens: int, at: float | None = None) -> None:
        self.samples.append((time.monotonic() if at is None else at, tokens))

    def rate(self) -> float | None:
        if len(self.samples) < 2:
            return None
        elapsed = self.samples[-1][0] - self.samples[0][0]
        tokens = sum(t for _, t in list(self.samples)[1:])
        return tokens / elapsed if elapsed > 0 else None


def eta_seconds(step: int, total: int, seconds_per_step: float | None) -> float | None:
    if seconds_per_step is None:
        return None
    return max(0, total - step) * seconds_per_step


def evaluation_due(global_step: int, every_steps: int, last_step: int) -> bool:
    """Evaluate after this optimizer step? Not after the last one: the final evaluation covers it."""
    return every_steps > 0 and global_step % every_steps == 0 and global_step < last_step


def with_eval_point(history: list[EvalPoint], point: EvalPoint) -> list[EvalPoint]:
    """The history with the point last, at most the latest MAX_EVAL_HISTORY. Points at or after its step go:
    a run resumed from an earlier checkpoint measures those steps again, on the model it trains now."""
    return ([p for p in history if p.step < point.step] + [point])[-MAX_EVAL_HISTORY:]


def eval_history_state(history: list[EvalPoint]) -> list[dict]:
    """The history as the checkpoint's trainer state keeps it."""
    return [p.model_dump(mode="json") for p in history]


def eval_history_from_state(state: dict | None) -> list[EvalPoint]:
    """The history a checkpoint's trainer state kept (none in checkpoints written before it was kept)."""
    return [EvalPoint.model_validate(p) for p in (state or {}).get("evalHistory", [])][-MAX_EVAL_HISTORY:]


class ProgressReporter:
    """Rank 0: keeps the latest Progress, writes it to S3 every interval from a thread."""

    def __init__(self, storage: Storage | None, uri: str, interval: float, port: int = 0):
        self.storage, self.uri, self.interval = storage, uri, interval
        self.progress = Progress(updatedAt=now())
        self.metrics = Metrics(port) if storage is not None else None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._dirty = True
        self._thread = None
        if storage is not None:
            self._thread = threading.Thread(target=self._run, daemon=True, name="progress-writer")
            self._thread.start()

    def update(self, **fields) -> None:
        if self.storage is None:
            return
        with self._lock:
            if "checkpoints" in fields:
                fields["checkpoints"] = [CheckpointRecord(**c) for c in fields["checkpoints"]]
            self.progress = self.progress.model_copy(update={**fields, "updatedAt": now()})
            self._dirty = True
        self.metrics.update(self.progress)

    def checkpoint_saved(self) -> None:
        if self.metrics:
            self.metrics.checkpoint_saved()

    def flush(self) -> None:
        if self.storage is None:
            return
        with self._lock:
            document, self._dirty = self.progress.model_dump(mode="json"), False
        try:
            self.storage.put_json(self.uri, document)
        except Exception as e:  # progress is best effort; the next write tries again
            log.warning("could not write %s: %s", self.uri, e)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self._dirty:
                self.flush()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self.flush()
        if self.metrics:
            self.metrics.close()
