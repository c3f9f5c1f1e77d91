"""Final artifacts: the adapter (PEFT format), the merged model (safetensors) and a model card."""

from __future__ import annotations

import json
from pathlib import Path


def save_trained(module, uses_adapter: bool, tokenizer, directory: Path) -> Path:
    """The adapter (peft methods) or the whole tuned model (full), with the tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    module.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def merge_adapter(base_dir: Path, adapter_dir: Path, tokenizer, directory: Path, load_kwargs: dict | None = None) -> Path:
    """Load the base model afresh, apply the adapter, fold it into the weights, save as safetensors."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, **(load_kwargs or {}))
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    directory.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def model_card(config_json: str, evaluation: dict, data_report: dict, base_uri: str, uses_adapter: bool,
               losses: dict[str, list[float]]) -> str:
    library = "peft" if uses_adapter else "transformers"
    final_losses = {stage: round(values[-1], 4) for stage, values in losses.items() if values}
    return "\n".join([
        "---",
        f"library_name: {library}",
        f"base_model: {base_uri}",
        "tags: [finetune-operator]",
        "---",
        "",
        "# Fine-tuned model",
        "",
        f"Trained by finetune-operator from `{base_uri}`.",
        "",
        "## Evaluation",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in evaluation.items()),
        *(f"| final training loss ({stage}) | {v} |" for stage, v in final_losses.items()),
        "",
        "## Data",
        "",
        f"Rows read: {data_report.get('rowsRead')}, dropped: {data_report.get('rowsDropped')}, "
        f"training sequences: {data_report.get('trainSequences')}, tokens: {data_report.get('trainTokens')}.",
        "",
        "## Training configuration",
        "",
        "```json",
        config_json,
        "```",
        "",
    ])


def write_model_card(directory: Path, text: str) -> None:
    (directory / "README.md").write_text(text)


def dumps(document) -> str:
    return json.dumps(document, indent=2, sort_keys=True)
