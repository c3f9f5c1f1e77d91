"""Checkpoints in S3: <prefix>/step-00000200/{rank-N/..., trainer-state.json, manifest.json}.

Every rank saves its part into a local folder, then uploads it in a background thread and marks
it done (`rank-N.done`); rank 0's thread waits for every rank's mark, writes manifest.json last
and prunes old checkpoints. A checkpoint without a manifest is never used.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from .errors import StorageError
from .storage import Storage, join

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer-state.json"
STEP_DIR = re.compile(r"step-(\d{8})/$")


def step_name(step: int) -> str:
    return f"step-{step:08d}/"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def complete_checkpoints(storage: Storage, prefix: str) -> list[tuple[int, str]]:
    """(step, uri) of checkpoints whose manifest exists, oldest first."""
    steps = set()
    for uri in storage.list_keys(prefix):
        rest = uri[len(prefix):]
        if rest.endswith("/" + MANIFEST):
            match = STEP_DIR.match(rest[: -len(MANIFEST)])
            if match:
                steps.add(int(match.group(1)))
    return [(s, prefix + step_name(s)) for s in sorted(steps)]


def all_checkpoint_dirs(storage: Storage, prefix: str) -> set[int]:
    steps = set()
    for uri in storage.list_keys(prefix):
        match = re.match(r"step-(\d{8})/", uri[len(prefix):])
        if match:
            steps.add(int(match.group(1)))
    return steps


class CheckpointManager:
    def __init__(self, storage: Storage, prefix: str, local_root: Path, rank: int, world_size: int, keep: int,
                 rank_wait_seconds: float = 600):
        self.storage, self.prefix, self.local_root = storage, prefix, Path(local_root)
        self.rank, self.world_size, self.keep = rank, world_size, keep
        self.rank_wait_seconds = rank_wait_seconds
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.records: list[dict] = []  # the complete checkpoints, for progress.json

    # ---- saving ----

    def save(self, step: int, engine, trainer_state: dict, background: bool = True) -> str:
        """Collective: every rank calls it at the same step."""
        self.wait()
        local = self.local_root / f"rank-{self.rank}" / step_name(step)
        shutil.rmtree(local, ignore_errors=True)
        local.mkdir(parents=True)
        engine.save(local)
        torch.save(rng_state(), local / f"rng-rank-{self.rank}.pt")
        if self.rank == 0:
            (local / TRAINER_STATE).write_text(json.dumps(trainer_state))
        uri = self.prefix + step_name(step)
        self._thread = threading.Thread(target=self._upload, args=(local, uri, step), daemon=True,
                                        name=f"checkpoint-upload-{step}")
        self._thread.start()
        if not background:
            self.wait()
        return uri

    def _upload(self, local: Path, uri: str, step: int) -> None:
        try:
            self.storage.upload_dir(local, uri)
            self.storage.put_bytes(join(uri, f"rank-{self.rank}.done"), b"")
            if self.rank == 0:
                self._finish(uri, step)
            shutil.rmtree(local, ignore_errors=True)
        except BaseException as e:  # surfaced to the training loop by wait()
            self._error = e

    def _finish(self, uri: str, step: int) -> None:
        deadline = time.monotonic() + self.rank_wait_seconds
        marks = [join(uri, f"rank-{r}.done") for r in range(self.world_size)]
        while not all(self.storage.exists(m) for m in marks):
            if time.monotonic() > deadline:
                raise StorageError(f"checkpoint {uri}: not every rank finished uploading")
            time.sleep(0.2)
        record = {"step": step, "uri": uri, "time": now()}
        self.storage.put_json(join(uri, MANIFEST), {**record, "worldSize": self.world_size})
        self.records.append(record)
        self.prune()

    def prune(self) -> None:
        complete = complete_checkpoints(self.storage, self.prefix)
        kept = {s for s, _ in complete[-self.keep:]}
        newest = max(kept, default=-1)
        for step in all_checkpoint_dirs(self.storage, self.prefix):
            # Older than the newest complete one and not kept (incomplete leftovers included).
            if step not in kept and step < newest:
                self.storage.delete_prefix(self.prefix + step_name(step))
        self.records = [r for r in self.records if r["step"] in kept]

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error if isinstance(error, StorageError) else StorageError(f"checkpoint upload failed: {error}")

    # ---- resuming ----

    def latest(self) -> tuple[int, str] | None:
        complete = complete_checkpoints(self.storage, self.prefix)
        self.records = [{"step": s, "uri": u, "time": (self.storage.get_json(join(u, MANIFEST)) or {}).get("time", "")}
                        for s, u in complete[-self.keep:]]
        return complete[-1] if complete else None

    def restore(self, uri: str, engine) -> dict:
        """Collective: download the checkpoint, load engine state and this rank's RNG; returns the trainer state."""
        local = self.local_root / f"rank-{self.rank}" / "restore"
        shutil.rmtree(local, ignore_errors=True)
        self.storage.download_prefix(uri, local)
        engine.load(local)
        rng_file = local / f"rng-rank-{self.rank}.pt"
        if rng_file.exists():
            restore_rng(torch.load(rng_file, weights_only=False))
        state = json.loads((local / TRAINER_STATE).read_text())
        shutil.rmtree(local, ignore_errors=True)
        return state

