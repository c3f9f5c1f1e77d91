"""The pod's exit code from torchrun's and the ranks' codes (finetune_trainer.launch)."""

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import finetune_trainer
from finetune_trainer import exit_codes
from finetune_trainer.launch import pod_exit_code
from finetune_trainer.metrics import gateway_port

E = exit_codes


def launcher_env(**variables: str) -> dict[str, str]:
    """A bare environment in which `python -m finetune_trainer.launch` runs the code under test (not
    another copy the interpreter's site-packages may point at)."""
    return {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(finetune_trainer.__file__).parents[1]), **variables}


@pytest.mark.parametrize(
    ("torchrun_code", "rank_codes", "expected"),
    [
        (0, [0, 0], 0),
        (1, [0, E.INVALID_DATA], E.INVALID_DATA),                    # permanent beats everything
        (1, [E.PREEMPTED, E.INVALID_CONFIG], E.INVALID_CONFIG),
        (1, [E.UNEXPECTED_ERROR, E.PREEMPTED], E.PREEMPTED),          # preemption first among retryable
        (1, [E.RETRYABLE_ERROR], E.RETRYABLE_ERROR),
        (1, [E.EVALUATION_GATE_FAILED, 0], E.EVALUATION_GATE_FAILED),
        (1, [], E.UNEXPECTED_ERROR),                                 # ranks died without a word
        (-9, [], 137),                                               # torchrun killed by SIGKILL
        (137, [], 137),
    ],
)
def test_pod_exit_code(torchrun_code, rank_codes, expected):
    assert pod_exit_code(torchrun_code, rank_codes) == expected


def test_retryable_codes_are_the_ones_the_training_operator_restarts():
    """The training-operator's ExitCode policy restarts pods on 128-255 and fails the job on 1-127."""
    assert all(128 <= code <= 255 for code in E.RETRYABLE)
    assert all(1 <= code <= 127 for code in E.PERMANENT)


def test_the_launcher_exits_with_the_trainers_code_through_torchrun(tmp_path):
    """A bad config is permanent (2) at the pod level too, not torchrun's generic 1."""
    config = tmp_path / "bad.json"
    config.write_text("{not json")
    result = subprocess.run([sys.executable, "-m", "finetune_trainer.launch", "--config", str(config)],
                            capture_output=True, text=True, timeout=120,
                            env=launcher_env(MASTER_ADDR="127.0.0.1", PET_NPROC_PER_NODE="1"))
    assert result.returncode == E.INVALID_CONFIG, result.stderr[-2000:]
    assert "InvalidConfig" in result.stderr


# ---- the metrics port of the Master, held by the launcher ----------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            return response.read().decode()
    except OSError:
        return None


def test_the_masters_metrics_port_answers_while_the_rendezvous_waits_for_a_worker(tmp_path):
    """A two-node run whose second node never comes (a worker unschedulable or pulling its image):
    torchrun waits in the rendezvous and starts no rank, and the Master's scrape target is up all
    the same, saying that the trainer is initializing."""
    config = tmp_path / "config.json"
    config.write_text("{}")  # never read: no rank starts
    port = _free_port()
    env = launcher_env(PET_NNODES="2", PET_NODE_RANK="0", PET_NPROC_PER_NODE="1", PET_MASTER_ADDR="127.0.0.1",
                       PET_MASTER_PORT=str(_free_port()), FINETUNE_TRAINER_METRICS_PORT=str(port))
    launcher = subprocess.Popen([sys.executable, "-m", "finetune_trainer.launch", "--config", str(config)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, text = time.monotonic() + 60, None
        while text is None and time.monotonic() < deadline and launcher.poll() is None:
            text = _scrape(port)
            time.sleep(0.2)
        assert text is not None, f"nothing answers on the metrics port (launcher exit {launcher.poll()})"
        assert 'finetune_trainer_phase{phase="initializing"} 1.0' in text, text
        assert "process_cpu_seconds_total" in text
        assert "finetune_trainer_step" not in text  # no progress yet: no progress gauges
        time.sleep(3)  # still waiting for the second node, and still answering
        assert launcher.poll() is None, launcher.communicate()[0][-2000:]
        assert 'finetune_trainer_phase{phase="initializing"} 1.0' in (_scrape(port) or "")
    finally:
        launcher.terminate()
        try:
            launcher.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            launcher.kill()
            launcher.communicate()
    assert _scrape(port) is None  # the launcher lets the port go when it exits


@pytest.mark.parametrize(("environ", "port"), [
    ({"FINETUNE_TRAINER_METRICS_PORT": "9090", "PET_NODE_RANK": "0"}, 9090),  # the Master
    ({"FINETUNE_TRAINER_METRICS_PORT": "9090"}, 9090),                        # one node, no training-operator
    ({"FINETUNE_TRAINER_METRICS_PORT": "9090", "PET_NODE_RANK": "1"}, 0),     # a worker: rank 0 runs elsewhere
    ({"FINETUNE_TRAINER_METRICS_PORT": "0", "PET_NODE_RANK": "0"}, 0),        # metrics off
    ({"PET_NODE_RANK": "0"}, 0),                                              # not set: rank 0 serves runtime.metricsPort
])
def test_the_gateway_runs_in_the_pod_of_rank_0_only(environ, port):
    assert gateway_port(environ) == port
