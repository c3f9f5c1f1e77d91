"""Pure builders: (FineTuneJob, OperatorConfig, observed inputs) -> whole Kubernetes objects."""

from finetune_operator.builders.names import JobRef, spec_hash
from finetune_operator.builders.run import config_map, pytorch_job, run_objects, trainer_config
from finetune_operator.builders.sandbox import resolve_pool, sandbox_name, sandbox_objects

__all__ = [
    "JobRef",
    "config_map",
    "pytorch_job",
    "resolve_pool",
    "run_objects",
    "sandbox_name",
    "sandbox_objects",
    "spec_hash",
    "trainer_config",
]
