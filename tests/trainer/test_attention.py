"""Which attention the trainer asks transformers for: varlen flash-attention on a GPU with the
flash_attn package (packed documents cost only their own blocks), transformers' default otherwise."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import transformers

from finetune_trainer import config as cfg
from finetune_trainer import run


@pytest.mark.parametrize("device_type, flash_attn_installed, expected", [
    ("cuda", True, {"attn_implementation": "flash_attention_2"}),
    ("cuda", False, {}),
    ("cpu", True, {}),
    ("cpu", False, {}),
])
def test_the_attention_follows_the_device_and_the_image(monkeypatch, device_type, flash_attn_installed, expected):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
        (object() if flash_attn_installed else None) if name == "flash_attn" else real(name, *a)))
    assert run.attention_implementation(device_type) == expected


def test_the_model_is_loaded_with_that_attention_and_the_methods_own_arguments(monkeypatch):
    loaded = {}
    monkeypatch.setattr(run, "attention_implementation", lambda device_type: {"attn_implementation": "flash_attention_2"})
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda path, **kwargs: loaded.update(path=path, **kwargs) or "model")
    method = SimpleNamespace(load_kwargs=lambda device_type: {"quantization_config": "nf4"})
    assert run.load_causal_lm(cfg.ModelSource(uri="s3://models/base/"), Path("/m"), method, "cuda") == "model"
    assert loaded == {"path": Path("/m"), "attn_implementation": "flash_attention_2", "quantization_config": "nf4"}
