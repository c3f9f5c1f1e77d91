"""qlora: LoRA on a base model quantized to 4-bit NF4 (bitsandbytes); needs a CUDA GPU."""

from __future__ import annotations

from ..errors import ConfigError
from . import MethodSpec, register
from .lora import lora_config


def require_gpu(device_type: str) -> None:
    if device_type != "cuda":
        raise ConfigError("method qlora needs a CUDA GPU (4-bit bitsandbytes kernels); this pod has none. "
                          "Use method lora on CPU.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("method qlora needs the bitsandbytes package in the trainer image") from None


def load_kwargs(device_type: str) -> dict:
    require_gpu(device_type)
    import torch
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16)}


def apply(model, method, device_type: str):
    require_gpu(device_type)
    from peft import get_peft_model, prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, lora_config(method))


SPEC = register(MethodSpec("qlora", apply, load_kwargs=load_kwargs))
