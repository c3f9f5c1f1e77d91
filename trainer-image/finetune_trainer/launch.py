"""`python -m finetune_trainer.launch --config <path>`: the command of every training pod.

It runs torchrun (the rendezvous settings come from the PET_* environment the Kubeflow
training-operator sets) with `python -m finetune_trainer` as the per-rank program, and exits with
the trainer's own exit code. torchrun alone exits 1 whenever a rank fails, which would turn a
preemption (retryable) into a permanent failure for the training-operator's ExitCode policy; here
every rank records its exit code in a folder and the pod exits with the most telling one.

In the pod of rank 0 it also holds the trainer's metrics port from the start (metrics.MetricsGateway):
torchrun starts the ranks only when every node has joined, so rank 0 alone would leave the Master's
scrape target down while a worker cannot start.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from . import exit_codes
from .metrics import start_gateway

EXIT_CODE_DIR_ENV = "FINETUNE_EXIT_CODE_DIR"


def record_exit_code(code: int) -> None:
    """Called by each rank on its way out (a no-op when not started by this launcher)."""
    folder = os.environ.get(EXIT_CODE_DIR_ENV)
    if folder:
        rank = os.environ.get("RANK", "0")
        Path(folder, f"rank-{rank}").write_text(str(code))


def pod_exit_code(torchrun_code: int, rank_codes: list[int]) -> int:
    """The pod's exit code from torchrun's and the ranks' own codes.

    A rank's own code wins over torchrun's generic 1. A permanent failure of any rank decides (a
    restart cannot help); otherwise a retryable one (preemption first); killed ranks that recorded
    nothing count as retryable (128 + signal, as the kernel reports them)."""
    if torchrun_code == 0 and all(code == 0 for code in rank_codes):
        return 0
    failures = [code for code in rank_codes if code != 0]
    permanent = [code for code in failures if code in exit_codes.PERMANENT]
    if permanent:
        return permanent[0]
    if exit_codes.PREEMPTED in failures:
        return exit_codes.PREEMPTED
    if failures:
        return failures[0]
    if torchrun_code < 0:  # torchrun itself killed by a signal
        return 128 - torchrun_code
    return torchrun_code if torchrun_code >= 128 else exit_codes.UNEXPECTED_ERROR


def torchrun_argv(nproc_per_node: str, trainer_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}",
            "-m", "finetune_trainer", *trainer_args]


def main(argv: list[str] | None = None) -> int:
    trainer_args = list(sys.argv[1:] if argv is None else argv)
    nproc = os.environ.get("FINETUNE_NPROC_PER_NODE") or os.environ.get("PET_NPROC_PER_NODE") or "1"
    gateway = start_gateway(dict(os.environ))
    try:
        with tempfile.TemporaryDirectory(prefix="finetune-exit-") as folder:
            env = dict(os.environ, **{EXIT_CODE_DIR_ENV: folder}, **(gateway.trainer_env() if gateway else {}))
            proc = subprocess.Popen(torchrun_argv(nproc, trainer_args), env=env)
            # Preemption: pass SIGTERM on; torchrun forwards it to the ranks, which checkpoint and exit.
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda signum, _frame: proc.send_signal(signum))
            torchrun_code = proc.wait()
            rank_codes = [int(p.read_text()) for p in sorted(Path(folder).glob("rank-*")) if p.read_text().strip()]
    finally:
        if gateway is not None:
            gateway.close()
    code = pod_exit_code(torchrun_code, rank_codes)
    if code:
        print(f"finetune_trainer.launch: exiting with {code} ({exit_codes.reason(code)}); "
              f"torchrun exited {torchrun_code}, ranks {rank_codes}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
