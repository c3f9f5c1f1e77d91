"""Benchmarks of the trainer (`make bench`): throughput against a plain Hugging Face Trainer + PEFT
script on the same model, data and settings, and the step-time cost of checkpointing."""
