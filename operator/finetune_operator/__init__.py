"""finetune-operator: a kopf operator that runs FineTuneJobs as sandboxed, distributed PyTorchJobs."""

__version__ = "0.1.0"
