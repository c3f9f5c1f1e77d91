"""Each side of a benchmark runs in its own process, so its peak memory is its own.

The parent writes a JSON spec, starts `python -m bench.<module> <spec>`, and reads the child's
result: the last line of its stdout that starts with RESULT_PREFIX. The peak resident set size comes
is the child's own high-water mark (VmHWM of /proc/self/status, read as it ends), not the
`wait4`/`RUSAGE_CHILDREN` ru_maxrss: on Linux that also counts the parent's memory image which the
child holds between fork and exec. The CPU time the rest of the machine used during the run is
recorded too (`otherCores`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "BENCH-RESULT "


def peak_rss_mib() -> float:
    """This process's peak resident set size (VmHWM), MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> tuple[float, float, float]:
    """(CPU seconds busy on the whole machine, of this process's waited-for children, of this process)."""
    import resource

    busy = 0.0
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        # user nice system idle iowait irq softirq steal ...: everything but idle and iowait
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    children, own = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
    return busy, children.ru_utime + children.ru_stime, own.ru_utime + own.ru_stime


def emit_result(result: dict) -> None:
    """Called by the child at its end: the result and its own peak memory, on the real stdout."""
    result = {**result, "childPeakRssMiB": round(peak_rss_mib(), 1)}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        result["cudaPeakMiB"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    sys.__stdout__.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.__stdout__.flush()


def read_spec() -> dict:
    return json.loads(Path(sys.argv[1]).read_text())


def run_child(module: str, spec: dict, log_dir: Path, name: str, timeout: float = 3600) -> dict:
    """Run `python -m module spec.json`; the child's result with its peak RSS (MiB) and wall seconds."""
    log_dir.mkdir(parents=True, exist_ok=True)
    spec_path = log_dir / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    stdout_path, stderr_path = log_dir / f"{name}.out", log_dir / f"{name}.err"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "trainer-image"),
                                                       os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    cpu_before = cpu_seconds()
    started = time.perf_counter()
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        process = subprocess.Popen([sys.executable, "-m", module, str(spec_path)], stdout=out, stderr=err,
                                   cwd=REPO, env=env)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    seconds = time.perf_counter() - started
    busy, children, own = (after - before for after, before in zip(cpu_seconds(), cpu_before))
    lines = [line for line in stdout_path.read_text(errors="replace").splitlines() if line.startswith(RESULT_PREFIX)]
    if process.returncode != 0 or not lines:
        tail = stderr_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{module} ({name}) exited with {process.returncode}; stderr ends with:\n{tail}")
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    # The child's own high-water mark. wait4's ru_maxrss is no good here: on Linux it also counts the
    # parent's memory image the child had between fork and exec.
    result["peakRssMiB"] = result["childPeakRssMiB"]
    result["processSeconds"] = round(seconds, 1)
    # What the rest of the machine used meanwhile (other builds, the S3 server), in cores: a busy
    # machine slows a run down, so this tells a clean round from a disturbed one.
    result["otherCores"] = round(max(0.0, busy - children - own) / seconds, 2) if busy else None
    return result


def run_here(module: str, spec: dict, log_dir: Path, name: str) -> dict:
    """run_child's result, the side run in this process instead (bench.gpu's quick self-check): no process
    start, but the peak RSS is this whole process's, not the side's own."""
    import importlib

    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / f"{name}.spec.json").write_text(json.dumps(spec))
    started = time.perf_counter()
    result = importlib.import_module(module).train(spec)
    result["peakRssMiB"] = round(peak_rss_mib(), 1)
    result["processSeconds"] = round(time.perf_counter() - started, 1)
    result["otherCores"] = None
    return result


if __name__ == "__main__":
    # The floor of every side's memory: a process that only imports what the trainers import.
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, Trainer  # noqa: F401

    emit_result({})
