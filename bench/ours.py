"""`python -m bench.ours spec.json`: one run of finetune_trainer (`finetune_trainer.run.execute`, as
in the training container, one process) against the benchmark's S3 server, in its own process so
that its peak memory is its own. Reports its step and checkpoint events (a step's time is the wall
time between consecutive step events, as for the references), its evaluation and its data report.
"""

from __future__ import annotations

import json
import tempfile
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

from .child import emit_result, read_spec


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def train(spec: dict) -> dict:
    from finetune_trainer import config as cfg
    from finetune_trainer import events as trainer_events
    from finetune_trainer.run import attention_implementation, execute
    from finetune_trainer.storage import from_config

    trainer_events.enable(True)  # the steps are read from the events (also when run in a process that turned them off)
    config = cfg.TrainerConfig.model_validate(spec["config"])
    captured = StringIO()
    with redirect_stdout(captured), tempfile.TemporaryDirectory() as work:
        summary = execute(config, Path(work))
    if summary.exit_code != 0:
        raise RuntimeError(f"trainer failed ({summary.exit_code}): {summary.result.message}")
    events = [json.loads(line) for line in captured.getvalue().splitlines() if line.startswith("{")]
    step_events = [e for e in events if e["event"] == "step"]
    steps, previous = [], None
    for e in step_events:
        # The events' times have millisecond resolution; the first step has no previous event: its own timer.
        wall = e["time"] - previous if previous is not None else e["seconds"]
        steps.append({"seconds": wall, "loopSeconds": e["seconds"], "tokens": e["tokens"], "loss": e["loss"]})
        previous = e["time"]
    report = from_config(config.storage).get_json(cfg.data_report_uri(config.output.uri, config.job.runId)) or {}
    evaluation = summary.evaluation
    device_type = "cuda" if torch_cuda_available() else "cpu"  # as distributed.init chooses
    attention = attention_implementation(device_type).get("attn_implementation", "sdpa (transformers' default)")
    return {"steps": steps, "checkpoints": [e for e in events if e["event"] == "checkpoint"], "dataReport": report,
            "attention": attention,
            "basePerplexity": evaluation.basePerplexity if evaluation else None,
            "perplexity": evaluation.perplexity if evaluation else None}


if __name__ == "__main__":
    emit_result(train(read_spec()))
