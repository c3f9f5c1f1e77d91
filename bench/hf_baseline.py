"""The baseline: a plain Hugging Face Trainer + PEFT LoRA script, timed per optimizer step."""

from __future__ import annotations

import time


def run_hf_trainer(model_dir, sequences, settings, output_dir) -> list[tuple[float, int]]:
    """Train with transformers.Trainer on the given token sequences; returns (seconds, tokens) per step."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    torch.manual_seed(settings["seed"])
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(model, LoraConfig(r=settings["rank"], lora_alpha=settings["alpha"], lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    rows = [{"input_ids": s.input_ids, "labels": [t if m else -100 for t, m in zip(s.input_ids, s.loss_mask)]}
            for s in sequences]
    tokens_seen = []

    def collate(batch):
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.tensor([r["input_ids"] + [settings["pad_id"]] * (width - len(r["input_ids"])) for r in batch])
        labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in batch])
        mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in batch])
        tokens_seen.append(int(mask.sum()))
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    durations: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            durations.append(time.perf_counter() - self.started)

    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=settings["steps"], per_device_train_batch_size=settings["batch_size"],
        learning_rate=settings["learning_rate"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, logging_steps=10**6, save_strategy="no", report_to=[], dataloader_num_workers=0,
        remove_unused_columns=False, seed=settings["seed"], use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate, callbacks=[StepTimer()])
    trainer.train()
    # One batch per step (no accumulation); the data loader may collate ahead, so pair by order.
    return list(zip(durations, tokens_seen))
