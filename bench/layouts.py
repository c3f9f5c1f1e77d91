"""`python -m bench.layouts spec.json`: where a padding-free step's time goes, on the benchmark's own data.

The same documents (ours' packed rows of a few steps), the same LoRA model, forward and backward
only, in three batch layouts:

- flattened: every packed row of the step laid end to end in one row, position_ids restarting per
  document, no attention_mask (what finetune_trainer's packing and `DataCollatorWithFlattening` do);
  transformers builds a block-diagonal causal mask over the whole row;
- packed rows: the step's packed rows as a batch of rows (each at most maxSeqLength, the short ones
  padded at the end, the padding a segment of its own), position_ids restarting per document;
  the block-diagonal mask is per row, so attention covers a row, not the whole step;
- padded: one document per row, padded to the longest (as the padding collator does).

On CPU, SDPA computes every block of a masked attention, so the cost of attention grows with the
square of the row's length: this tells how much a layout costs beyond its real tokens.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .child import emit_result, read_spec

IGNORE = -100


def labels_of(ids: list[int], mask: list[int]) -> list[int]:
    labels = [t if m else IGNORE for t, m in zip(ids, mask)]
    if labels:
        labels[0] = IGNORE
    return labels


def flattened(rows: list[list[dict]]) -> dict:
    import torch

    ids, pos, labels = [], [], []
    for row in rows:
        for d in row:
            ids += d["input_ids"]
            pos += range(len(d["input_ids"]))
            labels += labels_of(d["input_ids"], d["loss_mask"])
    return {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([pos]), "labels": torch.tensor([labels])}


def packed_rows(rows: list[list[dict]], pad_id: int) -> dict:
    import torch

    width = max(sum(len(d["input_ids"]) for d in row) for row in rows)
    ids, pos, labels = [], [], []
    for row in rows:
        r_ids, r_pos, r_labels = [], [], []
        for d in row:
            r_ids += d["input_ids"]
            r_pos += range(len(d["input_ids"]))
            r_labels += labels_of(d["input_ids"], d["loss_mask"])
        pad = width - len(r_ids)
        ids.append(r_ids + [pad_id] * pad)
        pos.append(r_pos + list(range(pad)))
        labels.append(r_labels + [IGNORE] * pad)
    return {"input_ids": torch.tensor(ids), "position_ids": torch.tensor(pos), "labels": torch.tensor(labels)}


def padded(rows: list[list[dict]], pad_id: int) -> dict:
    import torch

    documents = [d for row in rows for d in row]
    width = max(len(d["input_ids"]) for d in documents)
    ids = [d["input_ids"] + [pad_id] * (width - len(d["input_ids"])) for d in documents]
    mask = [[1] * len(d["input_ids"]) + [0] * (width - len(d["input_ids"])) for d in documents]
    labels = [labels_of(d["input_ids"], d["loss_mask"]) + [IGNORE] * (width - len(d["input_ids"])) for d in documents]
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}


def measure(spec: dict) -> dict:
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    s = spec["settings"]
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], attn_implementation="sdpa")
    model.config.use_cache = False
    torch.manual_seed(s["seed"])
    model = get_peft_model(model, LoraConfig(r=s["rank"], lora_alpha=s["alpha"], lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    steps = json.loads(Path(spec["batches_file"]).read_text())
    layouts = {"flattened": flattened, "packed rows": lambda r: packed_rows(r, spec["pad_id"]),
               "padded": lambda r: padded(r, spec["pad_id"])}

    def forward_backward(batch: dict) -> None:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs, use_cache=False).logits[:, :-1].float()
        targets = batch["labels"][:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)
        loss.backward()
        model.zero_grad(set_to_none=True)

    real = sum(len(d["input_ids"]) for step in steps for row in step for d in row)
    batches = {name: [build(step) for step in steps] for name, build in layouts.items()}
    for name in layouts:  # warm up every layout once
        forward_backward(batches[name][0])
    seconds = {name: 0.0 for name in layouts}
    for _ in range(spec.get("repeats", 2)):
        for name in layouts:  # interleaved, so that a busy moment hits every layout alike
            started = time.perf_counter()
            for batch in batches[name]:
                forward_backward(batch)
            seconds[name] += time.perf_counter() - started
    return {"realTokens": real, "steps": len(steps), "repeats": spec.get("repeats", 2),
            "layouts": {name: {"seconds": seconds[name] / spec.get("repeats", 2) / len(steps),
                               "tokensProcessed": sum(int(b["input_ids"].numel()) for b in batches[name]) / len(steps),
                               "rows": sum(int(b["input_ids"].shape[0]) for b in batches[name]) / len(steps),
                               "width": max(int(b["input_ids"].shape[1]) for b in batches[name])}
                        for name in layouts}}


if __name__ == "__main__":
    emit_result(measure(read_spec()))
