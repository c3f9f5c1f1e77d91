"""Every method and every objective trains on a tiny model (real torch, CPU) and its loss goes down."""

from __future__ import annotations

import pytest
from conftest import make_config, upload_dataset

from finetune_trainer import config as cfg
from finetune_trainer import exit_codes, methods, objectives
from finetune_trainer.run import execute


def went_down(losses: list[float]) -> bool:
    return sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


METHOD_CASES = [
    ("full", {"type": "full", "freezeLayers": 1}, 2e-3),
    ("lora", {"type": "lora", "lora": {"rank": 8, "alpha": 16, "dropout": 0.0, "targetModules": ["q_proj", "v_proj"]}}, 1e-2),
    ("dora", {"type": "dora", "lora": {"rank": 8, "alpha": 16, "dropout": 0.0}}, 1e-2),
    ("prefix", {"type": "prefix", "virtualTokens": 8}, 3e-2),
    ("prompt", {"type": "prompt", "virtualTokens": 8}, 3e-1),
    ("ia3", {"type": "ia3"}, 5e-2),
]


def test_registries_hold_every_method_and_objective():
    assert sorted(methods.METHODS) == sorted(m.value for m in cfg.MethodType)
    assert sorted(objectives.OBJECTIVES) == sorted(o.value for o in cfg.Objective)


@pytest.mark.parametrize("name,method,lr", METHOD_CASES, ids=[c[0] for c in METHOD_CASES])
def test_method_trains(name, method, lr, storage, model_bucket, bucket, s3_endpoint, tmp_path):
    ds = upload_dataset(storage, bucket, "chat", "chat", 40)
    config = make_config(bucket, model_bucket + "llama/", s3_endpoint, [ds], method=method,
                         hyperparameters={"maxSteps": 15, "learningRate": lr})
    summary = execute(config, tmp_path)
    assert summary.exit_code == 0, summary.result.message
    assert went_down(summary.losses["main"]), summary.losses
    assert summary.evaluation.perplexity < summary.evaluation.basePerplexity


def test_full_method_freezes_the_lowest_blocks(tiny_model_dirs):
    from transformers import AutoModelForCausalLM

    from finetune_trainer.methods import full

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"])
    full.apply(model, cfg.Method(type="full", freezeLayers=1), "cpu")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith(("model.embed_tokens", "model.layers.0.")) for n in trainable)
    assert any(n.startswith("model.layers.1.") for n in trainable) and "lm_head.weight" in trainable


OBJECTIVE_CASES = [
    ("causal-lm", "text", 1e-2),
    ("sft", "instruction", 1e-2),
    ("dpo", "preference", 1e-2),
]


@pytest.mark.parametrize("objective,fmt,lr", OBJECTIVE_CASES, ids=[c[0] for c in OBJECTIVE_CASES])
def test_objective_trains(objective, fmt, lr, storage, model_bucket, bucket, s3_endpoint, tmp_path):
    ds = upload_dataset(storage, bucket, fmt, fmt, 40)
    config = make_config(bucket, model_bucket + "llama/", s3_endpoint, [ds], objective=objective,
                         hyperparameters={"maxSteps": 15, "learningRate": lr})
    summary = execute(config, tmp_path)
    assert summary.exit_code == 0, summary.result.message
    assert went_down(summary.losses["main"]), summary.losses


def test_dpo_loss_starts_at_log_two():
    """Before the first update the policy is the reference: every margin is 0, the loss is log 2."""
    import math

    import torch

    from finetune_trainer.objectives import dpo

    class Constant(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 7)})()

    from finetune_trainer.data.tokenize import PreferencePair

    items = [PreferencePair([1, 2], [3, 4], [5], reference=(2 * -math.log(7), -math.log(7)))] * 3
    batch = dpo.collate(items, pad_id=0)
    loss, metrics = dpo.loss(Constant(), batch, cfg.Hyperparameters())
    assert dpo.pairs(batch) == 3
    assert loss.item() / 3 == pytest.approx(math.log(2), abs=1e-6)
    assert metrics == pytest.approx({"rewards/chosen": 0.0, "rewards/rejected": 0.0, "rewards/accuracies": 0.0,
                                     "rewards/margins": 0.0}, abs=1e-6)


def test_dpo_loss_and_reward_metrics_away_from_the_reference():
    """Margins other than 0, against hand-computed values (TRL's definitions: a reward is beta times the
    log-ratio of policy to reference; accuracy counts pairs whose chosen reward beats the rejected one;
    here as sums over the batch's pairs, divided by the pairs when logged)."""
    import math

    import torch

    from finetune_trainer.data.tokenize import PreferencePair
    from finetune_trainer.objectives import dpo

    class Constant(torch.nn.Module):  # every token has log-probability -log 7
        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 7)})()

    chosen_logp, rejected_logp = 2 * -math.log(7), -math.log(7)  # answers of 2 and 1 tokens
    # (policy - reference) for (chosen, rejected): (1.0, -0.5) in the first pair, (-0.3, 0.2) in the second
    items = [PreferencePair([1, 2], [3, 4], [5], reference=(chosen_logp - 1.0, rejected_logp + 0.5)),
             PreferencePair([1, 2], [3, 4], [5], reference=(chosen_logp + 0.3, rejected_logp - 0.2))]
    hyperparameters = cfg.Hyperparameters(dpoBeta=0.25)
    beta = hyperparameters.dpoBeta
    loss, metrics = dpo.loss(Constant(), dpo.collate(items, pad_id=0), hyperparameters)

    def logsigmoid(x):
        return -math.log1p(math.exp(-x))

    assert loss.item() == pytest.approx(-(logsigmoid(beta * 1.5) + logsigmoid(beta * -0.5)), rel=1e-5)
    assert metrics == pytest.approx({"rewards/chosen": beta * (1.0 - 0.3), "rewards/rejected": beta * (-0.5 + 0.2),
                                     "rewards/accuracies": 1.0, "rewards/margins": beta * (1.5 - 0.5)}, rel=1e-5)


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_dpo_reference_of_untrained_virtual_tokens_is_the_base_model(kind, tiny_model_dirs):
    """A DPO stage on fresh prefix/prompt tuning takes its reference log-probs with the adapter
    disabled (run.py): they must be the base model's own, not the base with random virtual tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from finetune_trainer import methods
    from finetune_trainer.data.tokenize import PreferencePair
    from finetune_trainer.distributed import DistContext
    from finetune_trainer.objectives import dpo
    from finetune_trainer.train import attach_reference_log_probs

    directory = tiny_model_dirs["llama"]
    torch.manual_seed(0)
    peft_model = methods.get(kind).apply(AutoModelForCausalLM.from_pretrained(directory),
                                         cfg.Method(type=kind, virtualTokens=4), "cpu")
    base = AutoModelForCausalLM.from_pretrained(directory)
    cpu = DistContext(0, 1, 0, torch.device("cpu"))

    def references(model) -> list[float]:
        pairs = [PreferencePair([5, 17, 42], [99, 3], [8, 61, 2]), PreferencePair([7, 7], [11], [12, 13])]
        attach_reference_log_probs(model, pairs, dpo.collate, dpo.pair_log_probs, 0, 2, cpu)
        return [value for pair in pairs for value in pair.reference]

    with peft_model.disable_adapter():
        disabled = references(peft_model)
    assert disabled == pytest.approx(references(base), abs=1e-5)
    assert references(peft_model) != pytest.approx(disabled, abs=1e-3)  # the virtual tokens do change them


def test_second_architecture_qwen2_trains(storage, model_bucket, bucket, s3_endpoint, tmp_path):
    ds = upload_dataset(storage, bucket, "chat", "chat", 40)
    config = make_config(bucket, model_bucket + "qwen2/", s3_endpoint, [ds],
                         hyperparameters={"maxSteps": 15, "learningRate": 1e-2})
    summary = execute(config, tmp_path)
    assert summary.exit_code == 0, summary.result.message
    assert went_down(summary.losses["main"])


def test_qlora_on_cpu_is_a_clear_permanent_error(storage, model_bucket, bucket, s3_endpoint, tmp_path):
    ds = upload_dataset(storage, bucket, "chat", "chat", 10)
    config = make_config(bucket, model_bucket + "llama/", s3_endpoint, [ds], method={"type": "qlora"})
    summary = execute(config, tmp_path)
    assert summary.exit_code == exit_codes.INVALID_CONFIG
    assert "qlora needs a CUDA GPU" in summary.result.message
    result = storage.get_json(cfg.result_uri(config.output.uri, "1"))
    assert result["succeeded"] is False and result["reason"] == "InvalidConfig"
