"""`python -m bench.layouts spec.json`: where a padding-free step's time goes, on the benchmark's own data.

The same documents (ours' packed rows of a few steps), the same LoRA model, forward and backward
only, in three batch layouts:

- flattened: every packed row of the step laid end to end in one row, position_ids restarting per
  document, no attention_mask (what `DataCollatorWithFlattening` does, and what finetune_trainer hands
  a flash-attention model); transformers builds a block-diagonal causal mask over the whole row;
- packed rows: the step's packed rows as a batch of rows (each at most maxSeqLength, the short ones
  padded at the end, the padding a segment of its own), position_ids restarting per document: what
  finetune_trainer trains on (its own `padding_free_batch`); the block-diagonal mask is per row, so
  attention covers a row, not the whole step;
- padded: one document per row, padded to the longest (as the padding collator does).

On CPU, SDPA computes every block of a masked attention, so the cost of attention grows with the
square of the row's length: this tells how much a layout costs beyond its real tokens.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from finetune_trainer.objectives.common import IGNORE, language_model_batch, next_token_logits, padding_free_batch

from .child import emit_result, read_spec


def documents(row: list[dict]) -> list[tuple[list[int], list[int]]]:
    return [(d["input_ids"], d["loss_mask"]) for d in row]


def flattened(rows: list[list[dict]], pad_id: int) -> dict:
    return padding_free_batch([[d for row in rows for d in documents(row)]], pad_id)


def packed_rows(rows: list[list[dict]], pad_id: int) -> dict:
    return padding_free_batch([documents(row) for row in rows], pad_id)


def padded(rows: list[list[dict]], pad_id: int) -> dict:
    one_each = [d for row in rows for d in documents(row)]
    return language_model_batch([ids for ids, _ in one_each], [mask for _, mask in one_each], pad_id)


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
    layouts = {"flattened": flattened, "packed rows": packed_rows, "padded": padded}

    def forward_backward(batch: dict) -> None:
        logits = next_token_logits(model, batch)[:, :-1].float()  # model.config.use_cache is off
        targets = batch["labels"][:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)
        loss.backward()
        model.zero_grad(set_to_none=True)

    real = sum(len(d["input_ids"]) for step in steps for row in step for d in row)
    batches = {name: [build(step, spec["pad_id"]) for step in steps] for name, build in layouts.items()}
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
