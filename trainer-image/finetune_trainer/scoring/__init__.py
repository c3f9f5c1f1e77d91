"""Scoring of generated answers: metrics against references, user checks, per-task scores of the base and
the tuned model, and the gates that accept or reject a run."""

from .checks import Check, pattern_problem
from .gates import GateOutcome, GeneralGate, PerplexityGate, TaskGate, evaluate_gates
from .metrics import METRICS, Metric, normalize, per_row
from .task import TaskScores, score_task

__all__ = ["Check", "GateOutcome", "GeneralGate", "METRICS", "Metric", "PerplexityGate", "TaskGate", "TaskScores",
           "evaluate_gates", "normalize", "pattern_problem", "per_row", "score_task"]
