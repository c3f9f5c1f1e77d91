"""The registry of fine-tuning methods: one small module each, registered by name.

A method turns a loaded base model into the model to train (freezing, adapters, virtual tokens);
some also change how the base model is loaded (qlora quantizes it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..errors import ConfigError


@dataclass(frozen=True)
class MethodSpec:
    name: str
    apply: Callable[..., Any]  # (model, method_config, device_type) -> model to train
    uses_adapter: bool = True  # trained weights are a PEFT adapter (False: the full model)
    load_kwargs: Callable[[str], dict] = lambda device_type: {}


METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    METHODS[spec.name] = spec
    return spec


def get(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}") from None


from . import dora, full, ia3, lora, prefix, prompt, qlora  # noqa: E402,F401  (each registers itself)
