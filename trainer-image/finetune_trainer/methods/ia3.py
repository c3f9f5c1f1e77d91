"""ia3: learned rescaling vectors on attention keys/values and the feed-forward input (IA3)."""

from __future__ import annotations

from ..errors import ConfigError
from . import MethodSpec, register


def apply(model, method, device_type: str):
    from peft import IA3Config, get_peft_model

    try:
        return get_peft_model(model, IA3Config(task_type="CAUSAL_LM"))
    except ValueError as e:
        raise ConfigError(f"method ia3 has no default target modules for {type(model).__name__}: {e}") from None


SPEC = register(MethodSpec("ia3", apply))
