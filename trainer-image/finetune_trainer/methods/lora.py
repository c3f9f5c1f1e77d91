"""lora: low-rank updates of the chosen linear layers (every linear layer of the blocks by default)."""

from __future__ import annotations

from . import MethodSpec, register

DEFAULT_TARGETS = "all-linear"


def lora_config(method, **extra):
    from peft import LoraConfig

    settings = method.lora
    if settings is None:
        from ..config import LoraSettings

        settings = LoraSettings()
    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.targetModules) or DEFAULT_TARGETS,
        task_type="CAUSAL_LM",
        **extra,
    )


def apply(model, method, device_type: str):
    from peft import get_peft_model

    return get_peft_model(model, lora_config(method))


SPEC = register(MethodSpec("lora", apply))
