"""Errors that end a run, each carrying the exit code the process ends with."""

from __future__ import annotations

from . import exit_codes


class TrainerError(Exception):
    exit_code = exit_codes.UNEXPECTED_ERROR

    @property
    def reason(self) -> str:
        return exit_codes.reason(self.exit_code)


class ConfigError(TrainerError):
    exit_code = exit_codes.INVALID_CONFIG


class DataError(TrainerError):
    exit_code = exit_codes.INVALID_DATA


class StorageError(TrainerError):
    exit_code = exit_codes.RETRYABLE_ERROR


class Preempted(TrainerError):
    exit_code = exit_codes.PREEMPTED


class EvaluationGateFailed(TrainerError):
    exit_code = exit_codes.EVALUATION_GATE_FAILED
