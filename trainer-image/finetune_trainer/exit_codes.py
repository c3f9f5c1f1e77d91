"""Exit codes of the trainer process: the operator decides from them whether a restart can help.

Imports nothing: the operator imports this module too.
"""

from __future__ import annotations

# Retryable codes are in 128-255 on purpose: the Kubeflow training-operator's `ExitCode` restart
# policy recreates a pod only for those (1-127 fail the job at once). Permanent codes are below 128.
SUCCEEDED = 0
# An unexpected error (a bug, an out-of-memory kill reported by Python). Retried: it may be transient.
UNEXPECTED_ERROR = 170
# The TrainerConfig is invalid or asks for something this machine cannot do (qlora without a GPU).
INVALID_CONFIG = 2
# A dataset or the model cannot be used: unreadable rows, missing files, no rows left after filtering.
INVALID_DATA = 3
# An evaluation gate failed (after training or in an evaluate-only run): evaluation.maxPerplexityRatio,
# evaluation.general.maxPerplexityRise or a task's gate (minScore, minGain); the outputs are still written.
EVALUATION_GATE_FAILED = 4
# A transient failure (S3 outage, network): nothing is wrong with the job, a restart resumes it.
RETRYABLE_ERROR = 175
# SIGTERM (preemption, eviction, node drain): a checkpoint was saved before exiting.
PREEMPTED = 143  # as a process killed by SIGTERM reports

PERMANENT = frozenset({INVALID_CONFIG, INVALID_DATA, EVALUATION_GATE_FAILED})
RETRYABLE = frozenset({UNEXPECTED_ERROR, RETRYABLE_ERROR, PREEMPTED})

REASONS = {
    SUCCEEDED: "Succeeded",
    UNEXPECTED_ERROR: "UnexpectedError",
    INVALID_CONFIG: "InvalidConfig",
    INVALID_DATA: "InvalidData",
    EVALUATION_GATE_FAILED: "EvaluationGateFailed",
    RETRYABLE_ERROR: "RetryableError",
    PREEMPTED: "Preempted",
}


def is_retryable(code: int) -> bool:
    """Whether restarting the pod can help (the operator restarts pods only on these codes)."""
    return code in RETRYABLE


def reason(code: int) -> str:
    return REASONS.get(code, "UnexpectedError")
