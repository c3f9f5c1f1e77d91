"""The references: a plain Hugging Face Trainer + PEFT LoRA script, timed per optimizer step.

`python -m bench.hf_baseline spec.json` (run by bench/__main__.py and bench/smollm2.py, one process
per run so that its peak memory is its own) trains on token sequences the trainer's own data
pipeline produced (so both sides see the same tokens) with one of the two collators a Hugging Face
user would pick:

- padding: `DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)`, the usual
  collator for causal LM rows with labels: every batch padded to its longest row;
- flattening: `DataCollatorWithFlattening`, the Trainer's padding-free setup: the batch laid end to
  end in one row with position_ids restarting per row and no attention_mask; transformers (5.x)
  then builds a block-diagonal causal mask from the position_ids (SDPA here). Before training the
  script checks that this holds: the logits of a flattened row equal those of its rows run alone.

A step's time is the wall time between consecutive `on_step_end` callbacks (the first from
`on_train_begin`): it includes everything the Trainer does per step (data loading, collation,
forward, backward, clipping, optimizer, scheduler, logging). With `evaluate` the script also
computes perplexity over the validation rows, token-weighted as finetune_trainer does. For the GPU
benchmark (bench/gpu.py) the spec can ask for bf16 mixed precision, a 4-bit NF4 base model (QLoRA)
and another attention implementation.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from .child import emit_result, read_spec


def labelled(rows: list[dict]) -> list[dict]:
    """{"input_ids", "loss_mask"} rows to the Trainer's {"input_ids", "attention_mask", "labels"}."""
    return [{"input_ids": r["input_ids"], "attention_mask": [1] * len(r["input_ids"]),
             "labels": [t if m else -100 for t, m in zip(r["input_ids"], r["loss_mask"])]} for r in rows]


def check_flattening(model, rows: list[dict], collator) -> float:
    """Max |logit difference| between a flattened batch and its rows run one at a time. Without a KV
    cache, as the Trainer runs (it sets `config.use_cache` to its `use_cache`, False): with a cache,
    transformers does not build the block-diagonal mask and the rows attend to each other."""
    import torch

    batch = collator([{k: r[k] for k in ("input_ids", "labels")} for r in rows])
    model.eval()
    with torch.no_grad():
        flat = model(input_ids=batch["input_ids"].to(model.device), position_ids=batch["position_ids"].to(model.device),
                     use_cache=False).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([r["input_ids"]], device=model.device), use_cache=False).logits[0]
                           for r in rows])
    model.train()
    return float((flat - alone).abs().max())


def perplexity(model, rows: list[dict], batch_size: int, pad_id: int) -> tuple[float, int]:
    """exp(sum of token NLL / number of predicted tokens) over right-padded batches: (perplexity, tokens)."""
    import torch
    import torch.nn.functional as F

    model.eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            width = max(len(r["input_ids"]) for r in chunk)
            ids = torch.tensor([r["input_ids"] + [pad_id] * (width - len(r["input_ids"])) for r in chunk])
            mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in chunk])
            labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in chunk])
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            targets = labels[:, 1:]
            nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                                         reduction="sum"))
            count += int((targets != -100).sum())
    model.train()
    return math.exp(nll / count), count


def plain_from_gguf(directory: str, gguf_file: str, attn_implementation: str = "sdpa", dtype=None):
    """A model loaded from a GGUF file, as a plain model. The Trainer refuses a model loaded from GGUF
    ("quantized with QuantizationMethod.GGUF ... do not support training"; nor will it save), though
    its weights are de-quantized on load: the same weights in a plain model of the same configuration."""
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, **({"dtype": dtype} if dtype else {}))
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=loaded.dtype, attn_implementation=attn_implementation)
    model.load_state_dict(loaded.state_dict())
    return model


def train(spec: dict) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, DataCollatorWithFlattening,
                              Trainer, TrainerCallback, TrainingArguments)

    s = spec["settings"]
    data = json.loads(Path(spec["rows_file"]).read_text())
    gguf = {"gguf_file": spec["gguf_file"]} if spec.get("gguf_file") else {}
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"], **gguf)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    load: dict = {"attn_implementation": spec.get("attn_implementation", "sdpa"), **gguf}
    if spec.get("quantization") == "nf4":  # QLoRA as PEFT documents it (and as finetune_trainer's qlora method does)
        from transformers import BitsAndBytesConfig

        load.update(quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16), device_map={"": torch.cuda.current_device()})
    if gguf:
        model = plain_from_gguf(spec["model_dir"], spec["gguf_file"], load["attn_implementation"])
    else:
        model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], **load)
    rows = labelled(data["train"])
    validation = labelled(data.get("validation", []))

    if spec["collator"] == "padding":
        inner = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    elif spec["collator"] == "flattening":
        inner = DataCollatorWithFlattening()
    else:
        raise ValueError(f"unknown collator {spec['collator']!r}")
    result: dict = {"collator": spec["collator"], "rows": len(rows), "attention": model.config._attn_implementation}
    if spec["collator"] == "flattening":
        result["flatteningMaxLogitDiff"] = check_flattening(model, rows[:6], inner)

    batches: list[tuple[int, int]] = []  # (real tokens, tokens processed) per collated batch, in order

    def collate(features):
        batch = inner(features)
        mask = batch.get("attention_mask")
        batches.append((int(mask.sum()) if mask is not None else batch["input_ids"].numel(), batch["input_ids"].numel()))
        return batch

    torch.manual_seed(s["seed"])
    if spec.get("quantization"):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=s["rank"], lora_alpha=s["alpha"], lora_dropout=0.0,
                                             target_modules=s.get("target_modules", "all-linear"),
                                             task_type="CAUSAL_LM"))
    if spec.get("evaluate"):
        with model.disable_adapter():
            result["basePerplexity"], result["evalTokens"] = perplexity(model, validation, s["batch_size"],
                                                                        tokenizer.pad_token_id)

    ends: list[float] = []
    losses: list[float] = []

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    args = TrainingArguments(
        output_dir=spec["output_dir"], max_steps=s["steps"], per_device_train_batch_size=s["batch_size"],
        learning_rate=s["learning_rate"], lr_scheduler_type=s.get("scheduler", "constant"),
        warmup_steps=s.get("warmup_steps", 0), weight_decay=0.0, max_grad_norm=1.0, logging_steps=1,
        save_strategy="no", report_to=[], dataloader_num_workers=0, remove_unused_columns=False, seed=s["seed"],
        use_cpu=not torch.cuda.is_available(), bf16=bool(spec.get("bf16")), disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate, callbacks=[StepTimer()])
    trainer.train()
    durations = [b - a for a, b in zip(ends, ends[1:])]
    # One batch per step (no accumulation); the data loader may collate one batch ahead: pair by order.
    result["steps"] = [{"seconds": d, "tokens": real, "processed": processed, "loss": loss}
                       for d, (real, processed), loss in zip(durations, batches, losses)]
    if spec.get("evaluate"):
        result["perplexity"], _ = perplexity(model, validation, s["batch_size"], tokenizer.pad_token_id)
    return result


if __name__ == "__main__":
    emit_result(train(read_spec()))
