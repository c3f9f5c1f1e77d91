"""The pod's exit code from torchrun's and the ranks' codes (finetune_trainer.launch)."""

import subprocess
import sys

import pytest

from finetune_trainer import exit_codes
from finetune_trainer.launch import pod_exit_code

E = exit_codes


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
                            env={"PATH": "/usr/bin:/bin", "MASTER_ADDR": "127.0.0.1", "PET_NPROC_PER_NODE": "1"})
    assert result.returncode == E.INVALID_CONFIG, result.stderr[-2000:]
    assert "InvalidConfig" in result.stderr
