"""prompt: trained virtual token embeddings prepended to the input (prompt tuning)."""

from __future__ import annotations

from . import MethodSpec, register
from .prefix import DEFAULT_VIRTUAL_TOKENS


def apply(model, method, device_type: str):
    from peft import PromptTuningConfig, get_peft_model

    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=method.virtualTokens or DEFAULT_VIRTUAL_TOKENS)
    return get_peft_model(model, config)


SPEC = register(MethodSpec("prompt", apply))
