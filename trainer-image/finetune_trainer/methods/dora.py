"""dora: LoRA with the weight split into magnitude and direction (weight-decomposed LoRA)."""

from __future__ import annotations

from . import MethodSpec, register
from .lora import lora_config


def apply(model, method, device_type: str):
    from peft import get_peft_model

    return get_peft_model(model, lora_config(method, use_dora=True))


SPEC = register(MethodSpec("dora", apply))
