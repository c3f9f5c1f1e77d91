"""Adapter reuse: continuing from an adapter in S3 (method.adapter) and combining LoRA adapters (output.combine)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from conftest import make_config, upload_dataset

from finetune_trainer import adapters
from finetune_trainer import config as cfg
from finetune_trainer import validation
from finetune_trainer.errors import ConfigError
from finetune_trainer.run import execute
from finetune_trainer.testing import tiny

IDS = torch.tensor([[5, 17, 42, 99, 3, 8, 61]])


def base_model(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory)


def peft_config(kind: str, rank: int = 4):
    """A config whose fresh adapter is not the identity, so that 'loaded' and 'fresh' are told apart."""
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig

    if kind in ("lora", "dora"):
        return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj", "down_proj"],
                          init_lora_weights=False, use_dora=kind == "dora", task_type="CAUSAL_LM")
    if kind == "ia3":
        return IA3Config(init_ia3_weights=False, task_type="CAUSAL_LM")
    if kind == "prefix":
        return PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")
    return PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")


def save_adapter(base_dir, directory, kind: str = "lora", seed: int = 0, rank: int = 4):
    """A random adapter of `kind` on the model in base_dir, saved in PEFT format; returns the PeftModel."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(base_model(base_dir), peft_config(kind, rank))
    model.save_pretrained(directory)
    return model.eval()


def upload_adapter(storage, bucket, tmp_path, base_dir, name, **kwargs) -> tuple[str, object]:
    model = save_adapter(base_dir, tmp_path / name, **kwargs)
    uri = f"{bucket}adapters/{name}/"
    storage.upload_dir(tmp_path / name, uri)
    return uri, model


def method(kind: str, uri: str) -> cfg.Method:
    return cfg.Method.model_validate({"type": kind, "adapter": {"uri": uri}})


# ---- continue from an adapter ----


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3", "prefix", "prompt"])
def test_continuing_starts_exactly_where_the_saved_adapter_was_and_trains_it(kind, storage, model_bucket, bucket,
                                                                             tiny_model_dirs, tmp_path):
    base_dir = tiny_model_dirs["llama"]
    uri, saved = upload_adapter(storage, bucket, tmp_path, base_dir, f"cont-{kind}", kind=kind, seed=3)
    model = adapters.continue_from(storage, base_model(base_dir), method(kind, uri), model_bucket + "llama/",
                                   base_dir, tmp_path / "download", "cpu")
    model.eval()
    with torch.no_grad():
        expected, got, base = saved(IDS).logits, model(IDS).logits, base_model(base_dir)(IDS).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got[:, -IDS.shape[1]:], base, atol=1e-3)  # (prompt: virtual positions come first)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(("lora_" in n or "ia3_" in n or "prompt_encoder" in n) for n in trainable)


@pytest.mark.parametrize("kind,method_type,message", [
    ("ia3", "lora", "a IA3 adapter cannot continue as method lora (needs LORA)"),
    ("lora", "dora", "a LORA adapter cannot continue as method dora (needs LORA with DoRA)"),
    ("dora", "lora", "a LORA with DoRA adapter cannot continue as method lora (needs LORA)"),
    ("prompt", "prefix", "a PROMPT_TUNING adapter cannot continue as method prefix (needs PREFIX_TUNING)"),
])
def test_an_adapter_of_another_method_is_refused(kind, method_type, message, storage, model_bucket, bucket,
                                                 tiny_model_dirs, tmp_path):
    base_dir = tiny_model_dirs["llama"]
    uri, _ = upload_adapter(storage, bucket, tmp_path, base_dir, f"other-{kind}-{method_type}", kind=kind)
    with pytest.raises(ConfigError, match=re.escape(f"method.adapter.uri {uri}: {message}")):
        adapters.continue_from(storage, base_model(base_dir), method(method_type, uri), "s3://m/llama/",
                               base_dir, tmp_path / "download", "cpu")


@pytest.mark.parametrize("kind,detail", [
    ("lora", "size mismatch"),
    ("prefix", "token_dim 16 \\(base 32\\), num_layers 3 \\(base 2\\)"),
    ("prompt", "token_dim 32 \\(base 64\\)"),
])
def test_an_adapter_of_another_base_model_is_refused_naming_both(kind, detail, storage, bucket, tiny_model_dirs,
                                                                 tmp_path):
    other = tiny.save_tiny_model(tmp_path / "other-base", "llama", hidden_size=32, layers=3)
    uri, _ = upload_adapter(storage, bucket, tmp_path, other, f"foreign-{kind}", kind=kind)
    with pytest.raises(ConfigError, match=f"(?s)method.adapter.uri {uri} does not fit base model s3://m/llama/.*{detail}"):
        adapters.continue_from(storage, base_model(tiny_model_dirs["llama"]), method(kind, uri), "s3://m/llama/",
                               tiny_model_dirs["llama"], tmp_path / "download", "cpu")


@pytest.mark.parametrize("trained_on, refused", [("sibling", True), ("same", False), (None, False)],
                         ids=["another-checkpoint-of-the-architecture", "its-own-base", "an-adapter-from-elsewhere"])
def test_an_adapter_this_trainer_wrote_continues_only_on_the_base_it_was_trained_on(
        trained_on, refused, storage, bucket, tiny_model_dirs, tmp_path):
    """Same architecture, other weights (a base and a sibling checkpoint): modules and shapes fit either way, so
    only the base recorded beside the adapter tells them apart. An adapter without that record is judged by its
    modules and shapes alone."""
    base_dir = tiny_model_dirs["llama"]
    sibling = tiny.save_tiny_model(tmp_path / "sibling", "llama", seed=1)
    name = f"recorded-{trained_on}"
    save_adapter(base_dir, tmp_path / name)
    if trained_on is not None:
        adapters.write_base(tmp_path / name, f"s3://m/{trained_on}/",
                            adapters.base_fingerprint(sibling if trained_on == "sibling" else base_dir))
    uri = f"{bucket}adapters/{name}/"
    storage.upload_dir(tmp_path / name, uri)
    if refused:
        with pytest.raises(ConfigError, match=re.escape(
                f"method.adapter.uri {uri} was trained on base model s3://m/sibling/, whose files differ from this "
                "job's base model s3://m/llama/")):
            adapters.continue_from(storage, base_model(base_dir), method("lora", uri), "s3://m/llama/", base_dir,
                                   tmp_path / "download", "cpu")
    else:
        adapters.continue_from(storage, base_model(base_dir), method("lora", uri), "s3://m/llama/", base_dir,
                               tmp_path / "download", "cpu")


def test_the_fingerprint_follows_the_files_not_where_they_are(tiny_model_dirs, tmp_path):
    import shutil

    base_dir = tiny_model_dirs["llama"]
    copy = shutil.copytree(base_dir, tmp_path / "copy")
    assert adapters.base_fingerprint(copy) == adapters.base_fingerprint(base_dir)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8 + int.from_bytes(data[:8], "little")] ^= 0xFF  # the first byte of the first tensor, past the header
    weights.write_bytes(bytes(data))
    assert adapters.base_fingerprint(copy) != adapters.base_fingerprint(base_dir)


def test_a_prefix_without_an_adapter_is_a_data_error(storage, bucket, tiny_model_dirs, tmp_path):
    from finetune_trainer.errors import DataError

    with pytest.raises(DataError, match="no PEFT adapter here"):
        adapters.continue_from(storage, base_model(tiny_model_dirs["llama"]), method("lora", f"{bucket}nothing/"),
                               "s3://m/llama/", tiny_model_dirs["llama"], tmp_path / "download", "cpu")


def test_a_run_continues_from_the_adapter_and_writes_the_trained_one(storage, model_bucket, bucket, s3_endpoint,
                                                                     tiny_model_dirs, tmp_path):
    from peft import PeftModel

    base_dir = tiny_model_dirs["llama"]
    uri, start = upload_adapter(storage, bucket, tmp_path, base_dir, "run-start", kind="lora", seed=5)
    ds = upload_dataset(storage, bucket, "cont-chat", "chat", 24)
    config = make_config(bucket, model_bucket + "llama/", s3_endpoint, [ds], method={"type": "lora", "adapter": {"uri": uri}},
                         output={"uri": bucket + "cont-out/"}, hyperparameters={"maxSteps": 3, "learningRate": 1e-2})
    summary = execute(config, tmp_path / "work")
    assert summary.exit_code == 0, summary.result.message
    storage.download_prefix(summary.result.adapterUri, tmp_path / "trained")
    trained = PeftModel.from_pretrained(base_model(base_dir), tmp_path / "trained").eval()
    assert trained.peft_config["default"].r == 4  # the adapter's own rank, not method.lora's default
    start_weights = {n: p for n, p in start.named_parameters() if "lora_" in n}
    moved = [n for n, p in trained.named_parameters() if "lora_" in n and not torch.allclose(p, start_weights[n])]
    assert moved and set(start_weights) == {n for n, _ in trained.named_parameters() if "lora_" in n}
    recorded = json.loads((tmp_path / "trained" / adapters.BASE_FILE).read_text())
    assert recorded == {"modelUri": model_bucket + "llama/", "fingerprint": adapters.base_fingerprint(base_dir)}


# ---- combine ----


def lora_deltas(model, adapter_name: str) -> dict[str, torch.Tensor]:
    """Per adapted module, the update delta W = scaling * B @ A of one adapter."""
    from peft.tuners.lora import LoraLayer

    return {name: module.get_delta_weight(adapter_name).detach() for name, module in model.named_modules()
            if isinstance(module, LoraLayer) and adapter_name in module.lora_A}


def lora_factors(model, adapter_name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    from peft.tuners.lora import LoraLayer

    return {name: (m.lora_A[adapter_name].weight.detach(), m.lora_B[adapter_name].weight.detach(),
                   m.scaling[adapter_name]) for name, m in model.named_modules()
            if isinstance(m, LoraLayer) and adapter_name in m.lora_A}


def expected_delta(combination: str, inputs: list[tuple[object, float]], module: str) -> torch.Tensor:
    if combination in ("cat", "svd"):  # exactly the weighted sum of the updates
        return sum(w * lora_deltas(m, "default")[module] for m, w in inputs)
    # linear: weighted sums of the factors, sqrt(w * scaling) on each side (PEFT), so cross terms appear
    a = sum(math.copysign(math.sqrt(abs(w * s)), w) * A for (A, _, s), (_, w) in
            ((lora_factors(m, "default")[module], (m, w)) for m, w in inputs))
    b = sum(math.sqrt(abs(w * s)) * B for (_, B, s), (_, w) in
            ((lora_factors(m, "default")[module], (m, w)) for m, w in inputs))
    return b @ a


def load_combined(base_dir, directory):
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model(base_dir), directory).eval()


@pytest.mark.parametrize("combination,weights,rank", [
    ("cat", (0.7, 0.3), 8),
    ("cat", (1.0, -0.5), 8),  # a negative weight subtracts an adapter's update
    ("svd", (0.7, 0.3), 8),  # svdRank defaults to the sum of ranks: exact
    ("linear", (0.7, 0.3), 4),
])
def test_combined_update_is_the_weighted_combination_per_module(combination, weights, rank, storage, bucket,
                                                                tiny_model_dirs, tmp_path):
    from transformers import AutoTokenizer

    base_dir = tiny_model_dirs["llama"]
    uris, models = zip(*(upload_adapter(storage, bucket, tmp_path, base_dir, f"c-{combination}-{i}", seed=10 + i)
                         for i in range(2)))
    combination_cfg = cfg.AdapterCombination.model_validate(
        {"adapters": [{"uri": u, "weight": w} for u, w in zip(uris, weights)], "method": combination,
         "includeTrained": False})
    out = adapters.combine(storage, combination_cfg, base_dir, {}, None, AutoTokenizer.from_pretrained(base_dir),
                           tmp_path / "work", "s3://m/llama/")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json"} <= {
        p.name for p in out.iterdir()}
    combined = load_combined(base_dir, out)
    assert combined.peft_config["default"].r == rank
    deltas = lora_deltas(combined, "default")
    assert set(deltas) == set(lora_deltas(models[0], "default"))
    for module, delta in deltas.items():
        assert torch.allclose(delta, expected_delta(combination, list(zip(models, weights)), module), atol=1e-5), module
    if combination == "linear":  # PEFT's linear is not the weighted sum of the updates
        some = next(iter(deltas))
        assert not torch.allclose(deltas[some], expected_delta("cat", list(zip(models, weights)), some), atol=1e-4)


@pytest.mark.parametrize("problem,message", [
    ("dora input", "output.combine.adapters\\[0\\].uri .*: only LoRA adapters can be combined, this one is LORA with DoRA"),
    ("linear ranks", "output.combine.method linear needs adapters of one rank, got ranks \\[4, 2\\]"),
    ("foreign base", "output.combine.adapters\\[1\\].uri .* does not fit base model s3://m/llama/"),
    ("recorded sibling base", "output.combine.adapters\\[1\\].uri .* was trained on base model s3://m/sibling/, "
                              "whose files differ from this job's base model s3://m/llama/"),
])
def test_combining_what_cannot_be_combined_is_refused(problem, message, storage, bucket, tiny_model_dirs, tmp_path):
    from transformers import AutoTokenizer

    base_dir = tiny_model_dirs["llama"]
    first = dict(kind="dora") if problem == "dora input" else {}
    second_base = tiny.save_tiny_model(tmp_path / "foreign", "llama", hidden_size=32) if problem == "foreign base" \
        else base_dir
    second = dict(rank=2) if problem == "linear ranks" else {}
    u0, _ = upload_adapter(storage, bucket, tmp_path, base_dir, f"bad0-{problem[:4]}", **first)
    if problem == "recorded sibling base":  # same architecture, other weights: only the record tells
        save_adapter(base_dir, tmp_path / "bad1-sibling")
        adapters.write_base(tmp_path / "bad1-sibling", "s3://m/sibling/",
                            adapters.base_fingerprint(tiny.save_tiny_model(tmp_path / "sibling", "llama", seed=1)))
        u1 = f"{bucket}adapters/bad1-sibling/"
        storage.upload_dir(tmp_path / "bad1-sibling", u1)
    else:
        u1, _ = upload_adapter(storage, bucket, tmp_path, second_base, f"bad1-{problem[:4]}", **second)
    combination = cfg.AdapterCombination.model_validate(
        {"adapters": [{"uri": u0}, {"uri": u1}], "method": "linear", "includeTrained": False})
    with pytest.raises(ConfigError, match=message):
        adapters.combine(storage, combination, base_dir, {}, None, AutoTokenizer.from_pretrained(base_dir),
                         tmp_path / "work", "s3://m/llama/")


def test_a_combine_only_job_writes_the_combined_adapter_and_its_result(storage, model_bucket, bucket, s3_endpoint,
                                                                       tiny_model_dirs, tmp_path):
    base_dir = tiny_model_dirs["llama"]
    uris, models = zip(*(upload_adapter(storage, bucket, tmp_path, base_dir, f"only-{i}", seed=20 + i)
                         for i in range(2)))
    config = make_config(bucket, model_bucket + "llama/", s3_endpoint, [], output={
        "uri": bucket + "only-out/", "combine": {"adapters": [{"uri": uris[0], "weight": 2.0}, {"uri": uris[1]}],
                                                 "includeTrained": False}})
    summary = execute(config, tmp_path / "work")
    assert summary.exit_code == 0, summary.result.message
    out = config.output.uri
    result = cfg.RunResult.model_validate(storage.get_json(cfg.result_uri(out, "1")))
    assert result.succeeded and result.combinedUri == cfg.combined_uri(out) and result.adapterUri is None
    assert not storage.list_keys(cfg.adapter_uri(out))  # nothing was trained
    storage.download_prefix(result.combinedUri, tmp_path / "combined")
    combined = load_combined(base_dir, tmp_path / "combined")
    for module, delta in lora_deltas(combined, "default").items():
        assert torch.allclose(delta, expected_delta("cat", [(models[0], 2.0), (models[1], 1.0)], module), atol=1e-5)
    assert "| 2.0 |" in (tmp_path / "combined" / "README.md").read_text()


def test_combining_after_training_includes_the_trained_adapter_by_weight(storage, model_bucket, bucket, s3_endpoint,
                                                                         tiny_model_dirs, tmp_path):
    from peft import PeftModel

    base_dir = tiny_model_dirs["llama"]
    uri, other = upload_adapter(storage, bucket, tmp_path, base_dir, "after-0", seed=30, rank=8)
    ds = upload_dataset(storage, bucket, "after-chat", "chat", 16)
    config = make_config(bucket, model_bucket + "llama/", s3_endpoint, [ds], hyperparameters={"maxSteps": 2},
                         output={"uri": bucket + "after-out/", "combine": {
                             "adapters": [{"uri": uri, "weight": 0.5}], "trainedWeight": 1.5}})
    summary = execute(config, tmp_path / "work")
    assert summary.exit_code == 0, summary.result.message
    storage.download_prefix(summary.result.adapterUri, tmp_path / "trained")
    storage.download_prefix(summary.result.combinedUri, tmp_path / "combined")
    trained = PeftModel.from_pretrained(base_model(base_dir), tmp_path / "trained").eval()
    combined = load_combined(base_dir, tmp_path / "combined")
    other_deltas = lora_deltas(other, "default")
    for module, delta in lora_deltas(combined, "default").items():
        expected = 1.5 * lora_deltas(trained, "default")[module] + 0.5 * other_deltas.get(module, 0)
        assert torch.allclose(delta, expected, atol=1e-5), module


# ---- rules ----


@pytest.mark.parametrize("overrides,problem", [
    (dict(datasets=[], output={"combine": {"adapters": [{"uri": "s3://bkt/a/"}], "includeTrained": False}}), None),
    (dict(datasets=[], output={"combine": {"adapters": [{"uri": "s3://bkt/a/"}]}}), "datasets: at least one dataset"),
    (dict(datasets=[]), "datasets: at least one dataset"),
    (dict(method={"type": "ia3"}, output={"combine": {"adapters": [{"uri": "s3://bkt/a/"}]}}),
     "output.combine.includeTrained needs method lora or qlora (a LoRA adapter), not ia3"),
    (dict(output={"combine": {"adapters": [{"uri": "s3://bkt/a/"}], "svdRank": 4}}),
     "output.combine.svdRank is only allowed with method svd"),
    (dict(method={"type": "full", "adapter": {"uri": "s3://bkt/a/"}}), "method.adapter is only allowed with an adapter"),
    (dict(method={"type": "lora", "lora": {"rank": 2}, "adapter": {"uri": "s3://bkt/a/"}}),
     "method.adapter keeps the adapter's own settings"),
    (dict(method={"type": "prefix", "adapter": {"uri": "s3://bkt/a/"}}), None),
])
def test_adapter_reuse_rules(overrides, problem):
    document = {"job": {"namespace": "n", "name": "j"}, "model": {"uri": "s3://bkt/m/"},
                "datasets": [{"uri": "s3://bkt/d.jsonl"}], "output": {"uri": "s3://bkt/out/"}}
    if "output" in overrides:
        overrides["output"] = {**document["output"], **overrides["output"]}
    found = validation.problems(cfg.TrainerConfig.model_validate({**document, **overrides}))
    assert (found == []) if problem is None else any(problem in p for p in found), found
