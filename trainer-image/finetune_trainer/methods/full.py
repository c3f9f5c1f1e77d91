"""full: every weight is trained, except the lowest freezeLayers blocks and the embeddings below them.

A model whose input embeddings and output head share one matrix (tie_word_embeddings: Llama-3.2,
Qwen2.5 small, Gemma, SmolLM) keeps that matrix trainable: freezing it would silently freeze the
output head too. The run says so in a `tied-embeddings` event.
"""

from __future__ import annotations

import torch

from .. import events
from ..errors import ConfigError
from . import MethodSpec, register


def transformer_blocks(model) -> torch.nn.ModuleList:
    """The list of transformer blocks, found by shape rather than by architecture name."""
    layers = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == layers:
            return module
    raise ConfigError(f"cannot find the {layers} transformer blocks of {type(model).__name__} to freeze")


def embeddings_tied(model) -> bool:
    output = model.get_output_embeddings()
    return output is not None and output.weight is model.get_input_embeddings().weight


def apply(model, method, device_type: str):
    freeze = method.freezeLayers or 0
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    if freeze:
        blocks = transformer_blocks(model)
        if freeze > len(blocks):
            raise ConfigError(f"method.freezeLayers={freeze} but the model has only {len(blocks)} blocks")
        if embeddings_tied(model):
            events.emit("tied-embeddings", message="the input embeddings are the output head's weights: kept trainable")
        else:
            model.get_input_embeddings().requires_grad_(False)
        for block in list(blocks)[:freeze]:
            block.requires_grad_(False)
    return model


SPEC = register(MethodSpec("full", apply, uses_adapter=False))
