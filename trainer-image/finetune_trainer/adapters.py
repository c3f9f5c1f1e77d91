"""Adapter reuse: continue training an adapter from S3 (method.adapter), and combine LoRA adapters by weight
into one (output.combine, PEFT's add_weighted_adapter), after training or as a job of its own."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from . import config as cfg
from .errors import ConfigError, DataError
from .storage import Storage

# method.type -> (adapter_config.json's peft_type, its use_dora)
PEFT_TYPES: dict[str, tuple[str, bool]] = {
    "lora": ("LORA", False),
    "qlora": ("LORA", False),
    "dora": ("LORA", True),
    "ia3": ("IA3", False),
    "prefix": ("PREFIX_TUNING", False),
    "prompt": ("PROMPT_TUNING", False),
}
# Names of adapter weights in a PEFT model's state dict; virtual tokens are not among them, PEFT loads those on
# their own (strictly: a wrong shape raises) and still lists them as missing.
ADAPTER_KEYS = ("lora_", "ia3_")
# Next to adapter_config.json of every adapter this trainer writes: the base model it was trained on.
BASE_FILE = "finetune-base.json"
FINGERPRINT_HEAD = 1 << 20


def base_fingerprint(base_dir: Path) -> str:
    """A digest of the base model's files as downloaded: each file's name and size, config.json whole and the
    first MiB of every other file (past a safetensors header, the weights' own bytes). Cheap for a model of any
    size, and unlike module names and shapes it tells two checkpoints of one architecture apart (a base and its
    instruction-tuned sibling)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in base_dir.rglob("*") if p.is_file()):
        name = path.relative_to(base_dir).as_posix()
        digest.update(f"{name}\0{path.stat().st_size}\0".encode())
        with path.open("rb") as f:
            digest.update(f.read() if name == "config.json" else f.read(FINGERPRINT_HEAD))
    return f"sha256:{digest.hexdigest()}"


def write_base(adapter_dir: Path, model_uri: str, fingerprint: str) -> None:
    """BASE_FILE into an adapter folder; `fingerprint`: base_fingerprint of the base it was trained on."""
    (adapter_dir / BASE_FILE).write_text(json.dumps({"modelUri": model_uri, "fingerprint": fingerprint}, indent=1) + "\n")


def check_base(adapter_dir: Path, base: str, field: str, uri: str, model_uri: str) -> None:
    """An adapter this trainer wrote names its base model: another base (the files differ) is refused, even when
    its modules and shapes fit. An adapter from elsewhere (no BASE_FILE) is judged by its modules and shapes only.
    `base`: base_fingerprint of this job's base model."""
    path = adapter_dir / BASE_FILE
    if not path.is_file():
        return
    try:
        recorded = json.loads(path.read_text())
        trained_on, fingerprint = str(recorded["modelUri"]), str(recorded["fingerprint"])
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{field} {uri}: {BASE_FILE} cannot be read: {e}") from None
    if fingerprint != base:
        raise ConfigError(f"{field} {uri} was trained on base model {trained_on[:300]}, whose files differ from "
                          f"this job's base model {model_uri}: the adapter would not fit it, even though its shapes "
                          "may (train a new adapter, or use the base it was trained on)")


def combine_only(config: cfg.TrainerConfig) -> bool:
    """A job with no training data that does not only evaluate: it only combines adapters (validation makes sure
    output.combine is set)."""
    return not config.datasets and not config.stages and not config.evaluation.only


def download(storage: Storage, uri: str, directory: Path, field: str) -> dict:
    """The adapter under uri in directory; its adapter_config.json."""
    if not storage.download_prefix(uri, directory) or not (directory / "adapter_config.json").is_file():
        raise DataError(f"{field} {uri}: no PEFT adapter here (adapter_config.json missing)")
    try:
        return json.loads((directory / "adapter_config.json").read_text())
    except ValueError as e:
        raise DataError(f"{field} {uri}: adapter_config.json is not JSON: {e}") from None


def adapter_kind(adapter_config: dict) -> str:
    peft_type = str(adapter_config.get("peft_type", "?"))
    return f"{peft_type} with DoRA" if adapter_config.get("use_dora") else peft_type


def check_type(adapter_config: dict, method_type: str, field: str, uri: str) -> None:
    peft_type, dora = PEFT_TYPES[method_type]
    if (adapter_config.get("peft_type"), bool(adapter_config.get("use_dora"))) != (peft_type, dora):
        raise ConfigError(f"{field} {uri}: a {adapter_kind(adapter_config)} adapter cannot continue as method "
                          f"{method_type} (needs {peft_type}{' with DoRA' if dora else ''})")


def _expected_prompt_dims(peft_type: str, model) -> dict:
    """The dimensions PEFT gives fresh virtual tokens on this base (its own rule: grouped-query attention makes
    a prefix's token_dim head_dim x key/value heads, not hidden_size)."""
    from peft import PrefixTuningConfig, PromptTuningConfig
    from peft.utils.other import _prepare_prompt_learning_config

    fresh = (PrefixTuningConfig if peft_type == "PREFIX_TUNING" else PromptTuningConfig)(task_type="CAUSAL_LM",
                                                                                         num_virtual_tokens=1)
    _prepare_prompt_learning_config(fresh, model.config)
    keys = ("token_dim", "num_layers", "num_attention_heads") if peft_type == "PREFIX_TUNING" else ("token_dim",)
    return {k: getattr(fresh, k) for k in keys}


def check_prompt_learning_fits(adapter_config: dict, model, field: str, uri: str, model_uri: str) -> None:
    """Virtual tokens carry the base's dimensions in their config; PEFT would load them onto any base and fail
    (or worse, run) later."""
    peft_type = adapter_config.get("peft_type")
    if peft_type not in ("PREFIX_TUNING", "PROMPT_TUNING"):
        return
    wrong = {k: (adapter_config.get(k), v) for k, v in _expected_prompt_dims(peft_type, model).items()
             if adapter_config.get(k) is not None and adapter_config.get(k) != v}
    if wrong:
        detail = ", ".join(f"{k} {a} (base {b})" for k, (a, b) in wrong.items())
        raise ConfigError(f"{field} {uri} does not fit base model {model_uri}: {detail}")


def continue_from(storage: Storage, model, method: cfg.Method, model_uri: str, base_dir: Path, directory: Path,
                  device_type: str):
    """The base model with method.adapter loaded as the trainable adapter (instead of a fresh one)."""
    from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    field, uri = "method.adapter.uri", method.adapter.uri
    adapter_config = download(storage, uri, directory, field)
    check_type(adapter_config, method.type, field, uri)
    check_base(directory, base_fingerprint(base_dir), field, uri, model_uri)
    check_prompt_learning_fits(adapter_config, model, field, uri, model_uri)
    if method.type == "qlora":
        from .methods.qlora import require_gpu
        from peft import prepare_model_for_kbit_training

        require_gpu(device_type)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    # Built as a fresh trainable adapter from the saved config, then the saved weights put in: PEFT's
    # from_pretrained(is_trainable=True) refuses prompt-learning adapters.
    try:
        peft_config = PeftConfig.from_pretrained(directory)
        peft_config.inference_mode = False
        peft_model = get_peft_model(model, peft_config)
        loaded = set_peft_model_state_dict(peft_model, load_peft_weights(str(directory), device="cpu"))
    except (RuntimeError, ValueError, KeyError) as e:
        # size mismatches (RuntimeError) and target modules the base lacks (ValueError)
        raise ConfigError(f"{field} {uri} does not fit base model {model_uri} "
                          f"({type(model).__name__}): {str(e)[:600]}") from None
    missing = [k for k in loaded.missing_keys if any(t in k for t in ADAPTER_KEYS)]
    if missing:
        raise ConfigError(f"{field} {uri} does not fit base model {model_uri}: the adapter has no weights for "
                          f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return peft_model


def combine(storage: Storage, combination: cfg.AdapterCombination, base_dir: Path, load_kwargs: dict,
            trained_dir: Path | None, tokenizer, work_dir: Path, model_uri: str) -> Path:
    """The weighted combination of the inputs (and the trained adapter, first, when given) as one PEFT adapter
    folder, with the tokenizer and a short card."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    fingerprint = base_fingerprint(base_dir)  # the inputs are checked against it, the output records it
    sources: list[tuple[str, Path, float]] = []
    if trained_dir is not None:
        sources.append(("this job's trained adapter", trained_dir, combination.trainedWeight))
    for i, item in enumerate(combination.adapters):
        field = f"output.combine.adapters[{i}].uri"
        directory = work_dir / "inputs" / str(i)
        adapter_config = download(storage, item.uri, directory, field)
        if adapter_config.get("peft_type") != "LORA" or adapter_config.get("use_dora"):
            raise ConfigError(f"{field} {item.uri}: only LoRA adapters can be combined, this one is "
                              f"{adapter_kind(adapter_config)}")
        check_base(directory, fingerprint, field, item.uri, model_uri)
        sources.append((f"{field} {item.uri}", directory, item.weight))

    base = AutoModelForCausalLM.from_pretrained(base_dir, **load_kwargs)
    names = [f"input{i}" for i in range(len(sources))]
    model = None
    for name, (what, directory, _) in zip(names, sources):
        try:
            if model is None:
                model = PeftModel.from_pretrained(base, directory, adapter_name=name)
            else:
                model.load_adapter(directory, adapter_name=name)
        except (RuntimeError, ValueError, KeyError) as e:
            raise ConfigError(f"{what} does not fit base model {model_uri}: {str(e)[:600]}") from None
    ranks = [model.peft_config[n].r for n in names]
    method = combination.method
    if method == "linear" and len(set(ranks)) > 1:
        raise ConfigError(f"output.combine.method linear needs adapters of one rank, got ranks {ranks} "
                          f"(use cat or svd)")
    svd_rank = (combination.svdRank or sum(ranks)) if method == "svd" else None
    try:
        model.add_weighted_adapter(names, [w for _, _, w in sources], "combined", combination_type=method,
                                   svd_rank=svd_rank)
    except ValueError as e:
        raise ConfigError(f"output.combine: PEFT cannot combine these adapters: {e}") from None
    for name in names:
        model.delete_adapter(name)
    saved = work_dir / "saved"
    model.save_pretrained(saved, selected_adapters=["combined"], safe_serialization=True)
    out = saved / "combined"  # PEFT writes an adapter not named "default" into a folder of its name
    tokenizer.save_pretrained(out)
    write_base(out, model_uri, fingerprint)
    (out / "README.md").write_text("\n".join([
        "---", "library_name: peft", f"base_model: {model_uri}", "tags: [finetune-operator]", "---", "",
        "# Combined LoRA adapter", "",
        f"PEFT add_weighted_adapter, combination_type {method}" + (f", rank {svd_rank}" if svd_rank else "") + ".", "",
        "| adapter | weight |", "|---|---|", *(f"| {what} | {weight} |" for what, _, weight in sources), ""]))
    return out
