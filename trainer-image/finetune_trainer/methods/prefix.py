"""prefix: trained key/value prefixes in every attention layer (prefix tuning)."""

from __future__ import annotations

from . import MethodSpec, register

DEFAULT_VIRTUAL_TOKENS = 20


def apply(model, method, device_type: str):
    from peft import PrefixTuningConfig, get_peft_model

    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=method.virtualTokens or DEFAULT_VIRTUAL_TOKENS)
    return get_peft_model(model, config)


SPEC = register(MethodSpec("prefix", apply))
