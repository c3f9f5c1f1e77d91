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
               losses: dict[str, list[float]], rejected: list[str] | None = None, report_uri: str | None = None) -> str:
    """README.md of the outputs; `rejected`: the messages of the evaluation gates that failed."""
    library = "peft" if uses_adapter else "transformers"
    final_losses = {stage: round(values[-1], 4) for stage, values in losses.items() if values}
    scalars = {k: v for k, v in evaluation.items() if not isinstance(v, (list, dict))}
    task_rows = [f"| {task['name']} {metric} | {_score(scores.get('base'))} | {_score(scores.get('tuned'))} |"
                 for task in evaluation.get("tasks", []) for metric, scores in task.get("metrics", {}).items()]
    general = evaluation.get("general") or {}
    verdict = (["**Rejected by the evaluation gates** (the outputs are kept for inspection):", "",
                *(f"- {message}" for message in rejected), ""] if rejected else [])
    return "\n".join([
        "---",
        f"library_name: {library}",
        f"base_model: {base_uri}",
        "tags: [finetune-operator" + (", rejected]" if rejected else "]"),
        "---",
        "",
        "# Fine-tuned model",
        "",
        f"Trained by finetune-operator from `{base_uri}`.",
        "",
        *verdict,
        "## Evaluation",
        "",
        *([f"The full report, with plots and side-by-side answers: `{report_uri}report.md` (and `report.html`).", ""]
          if report_uri else []),
        "| metric | value |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in scalars.items()),
        *(f"| general perplexity ({k}) | {v} |" for k, v in general.items() if v is not None),
        *(f"| final training loss ({stage}) | {v} |" for stage, v in final_losses.items()),
        "",
        *(["| task metric | base | tuned |", "|---|---|---|", *task_rows, ""] if task_rows else []),
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


def _score(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def write_model_card(directory: Path, text: str) -> None:
    (directory / "README.md").write_text(text)


def dumps(document) -> str:
    return json.dumps(document, indent=2, sort_keys=True)
