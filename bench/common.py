"""Helpers shared by the CPU benchmarks (`python -m bench`) and the GPU one (`python -m bench.gpu`):
the S3 server, steady-state figures of a run, and batch sizes with equal work per step. Importing
this sets no environment (the CPU benchmark pins DeepSpeed to the CPU, the GPU one must not)."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

WARMUP_STEPS = 5


def start_s3() -> tuple[subprocess.Popen, str]:
    """The local cluster's S3 server (moto) on a free port, its log in a temporary folder."""
    from e2e.localcluster import s3 as local_s3
    from e2e.localcluster.procs import free_port

    port = free_port()
    process = local_s3.start_s3_server(port, Path(tempfile.mkdtemp(prefix="bench-s3-")) / "s3.log")
    os.environ.update(AWS_ACCESS_KEY_ID=local_s3.ACCESS_KEY, AWS_SECRET_ACCESS_KEY=local_s3.SECRET_KEY,
                      AWS_DEFAULT_REGION=local_s3.REGION)
    return process, f"http://127.0.0.1:{port}"


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def steady(result: dict, warmup: int = WARMUP_STEPS) -> dict:
    """Real tokens per second, step time, tokens per step and padding share after the warm-up steps."""
    steps = result["steps"]
    measured = steps[warmup:] if len(steps) > warmup + 1 else steps[1:]
    seconds = sum(s["seconds"] for s in measured)
    tokens = sum(s["tokens"] for s in measured)
    processed = sum(s.get("processed", s["tokens"]) for s in measured)
    losses = [s["loss"] for s in steps]
    return {"tokensPerSecond": tokens / seconds, "stepSeconds": seconds / len(measured),
            "tokensPerStep": tokens / len(measured), "padding": 1 - tokens / processed, "steps": len(measured),
            "firstLoss": mean(losses[:5]), "lastLoss": mean(losses[-10:]), "peakRssMiB": result["peakRssMiB"],
            "otherCores": result.get("otherCores"), "cudaPeakMiB": result.get("cudaPeakMiB")}


def match_batch_sizes(mean_row: float, mean_packed: float, hf_batch: int) -> tuple[int, int]:
    """(HF batch in rows, our batch in packed rows) with about the same real tokens per step: our
    batch is the number of packed rows nearest to hf_batch rows; when that misses by more than 5%,
    the HF batch nearest to hf_batch for which some number of packed rows is within 5%."""
    ours = max(1, round(hf_batch * mean_row / mean_packed))
    if abs(ours * mean_packed / (hf_batch * mean_row) - 1) <= 0.05:
        return hf_batch, ours
    candidates = []
    for hf in range(max(1, hf_batch // 2), 2 * hf_batch + 1):
        b = max(1, round(hf * mean_row / mean_packed))
        error = abs(b * mean_packed / (hf * mean_row) - 1)
        candidates.append((error > 0.05, abs(hf - hf_batch), error, hf, b))
    _, _, _, hf, b = min(candidates)
    return hf, b
