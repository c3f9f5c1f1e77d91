"""The engine's smaller rules, each checked against the reference behaviour (Hugging Face Trainer,
TRL): weight decay groups, the fp16 loss scaler, tied embeddings, dropout under DPO, the schedule's
epoch coverage, per-epoch mixing, evaluation sampling and resuming with another world size."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from finetune_trainer import config as cfg
from finetune_trainer import engines, evaluation, schedule
from finetune_trainer.data import mixing
from finetune_trainer.distributed import DistContext
from finetune_trainer.errors import ConfigError
from finetune_trainer.methods import full
from finetune_trainer.run import check_same_world_size
from finetune_trainer.testing import tiny

CPU = DistContext(0, 1, 0, torch.device("cpu"))


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.train_tokenizer()


def test_no_weight_decay_on_biases_and_norms(tokenizer):
    model = tiny.build_model(tokenizer, "qwen2")  # qwen2 has q/k/v biases
    optimizer = engines.make_optimizer(model, cfg.Hyperparameters(weightDecay=0.1))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] for p in g["params"]}
    undecayed = {names[id(p)] for g in optimizer.param_groups if not g["weight_decay"] for p in g["params"]}
    assert any(n.endswith("q_proj.bias") for n in undecayed)
    assert any("layernorm" in n or n.endswith("norm.weight") for n in undecayed)
    assert not any(n.endswith(".bias") or "norm" in n for n in decayed)
    assert any(n.endswith("q_proj.weight") for n in decayed) and "lm_head.weight" in decayed


def test_fp16_skipped_step_does_not_advance_the_schedule_and_the_scaler_is_checkpointed(tokenizer, tmp_path):
    model = tiny.build_model(tokenizer, "llama")
    hp = cfg.Hyperparameters(learningRate=1e-3, warmupRatio=0.5, scheduler="linear", maxGradNorm=1.0)
    engine = engines.DDPEngine(model, hp, 10, CPU, "fp32")
    engine.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    engine.scaler.scale(torch.tensor(1.0))  # what backward() does first
    for p in engine.module.parameters():
        p.grad = torch.full_like(p, float("inf"))
    engine.step()  # overflow: the scaler halves its scale and skips the optimizer step
    assert engine.scaler.get_scale() == 512.0 and engine.scheduler.last_epoch == 0
    engine.scaler.scale(torch.tensor(1.0))
    for p in engine.module.parameters():
        p.grad = torch.zeros_like(p)
    engine.step()
    assert engine.scheduler.last_epoch == 1
    engine.save(tmp_path)
    restored = engines.DDPEngine(tiny.build_model(tokenizer, "llama"), hp, 10, CPU, "fp32")
    restored.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    restored.load(tmp_path)
    assert restored.scaler.get_scale() == 512.0


def test_freezing_a_tied_model_keeps_its_output_head_trainable(tokenizer, capsys):
    from finetune_trainer import events

    model = tiny.build_model(tokenizer, "llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.get_input_embeddings().weight
    events.enable(True)
    full.apply(model, cfg.Method(type="full", freezeLayers=1), "cpu")
    assert model.lm_head.weight.requires_grad
    assert not any(p.requires_grad for p in model.model.layers[0].parameters())
    assert '"event": "tied-embeddings"' in capsys.readouterr().out


STAGE_DROPOUT_CASES = [  # (whether each stage in turn is a preference stage, the dropout rate each trains with)
    ("dpo", [True], [0.0]),
    ("sft then dpo", [False, True], [0.1, 0.0]),
    ("dpo then sft", [True, False], [0.0, 0.1]),
    ("dpo, sft, kto, sft", [True, False, True, False], [0.0, 0.1, 0.0, 0.1]),
]


@pytest.mark.parametrize("name,preference,rates", STAGE_DROPOUT_CASES, ids=[c[0] for c in STAGE_DROPOUT_CASES])
def test_a_preference_stage_trains_without_dropout_and_the_next_stage_gets_it_back(name, preference, rates, tokenizer):
    from peft import LoraConfig, get_peft_model

    from finetune_trainer import dropout

    model = get_peft_model(tiny.build_model(tokenizer, "llama"), LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj"]))
    configured = dropout.configured_rates(model)
    assert configured and set(configured.values()) == {0.1}
    for is_preference, rate in zip(preference, rates):
        dropout.set_for_stage(model, configured, preference=is_preference)
        assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {rate}, name


EPOCH_CASES = [  # (items, world size, batch, accumulation)
    (10, 1, 4, 1),
    (10, 2, 2, 2),
    (25, 2, 3, 4),   # the case that repeated 28 % of the rows
    (7, 4, 1, 3),
]


@pytest.mark.parametrize("n,world,batch,accumulation", EPOCH_CASES)
def test_an_epoch_uses_every_row_exactly_once(n, world, batch, accumulation):
    per_rank = [schedule.epoch_micro_batches(n, 3, 42, rank, world, batch, accumulation) for rank in range(world)]
    counts = {len(batches) for batches in per_rank}
    assert len(counts) == 1  # every rank runs the same number of micro-batches
    seen = Counter(i for batches in per_rank for batch in batches for i in batch if i < n)
    assert seen == Counter(range(n))


def test_a_down_sampled_dataset_gets_a_fresh_subset_every_epoch():
    big, small = [("big", i) for i in range(60)], [("small", i) for i in range(20)]
    weights = [0.25, 0.75]  # big contributes 20 of its 60 rows per epoch
    assert mixing.down_samples([60, 20], weights)
    subsets = [frozenset(r for r in mixing.mix([big, small], weights, 7, epoch) if r[0] == "big") for epoch in range(4)]
    assert all(len(s) == 20 for s in subsets)
    assert len(set(subsets)) == 4 and len(frozenset().union(*subsets)) > 40
    assert mixing.mix([big, small], weights, 7, 2) == mixing.mix([big, small], weights, 7, 2)


def test_evaluation_samples_every_dataset_not_the_first():
    items = [("first", i) for i in range(100)] + [("second", i) for i in range(100)]
    sampled = evaluation.sample(items, 50)
    assert len(sampled) == 50 and {name for name, _ in sampled} == {"first", "second"}
    assert sampled == evaluation.sample(items, 50)


@pytest.mark.parametrize("written_by,now,refused", [(2, 2, False), (2, 4, True), (4, 1, True), (None, 3, False)])
def test_resuming_needs_the_world_size_that_wrote_the_checkpoint(written_by, now, refused, storage, bucket):
    uri = f"{bucket}ckpt/step-00000004/"
    storage.put_json(uri + "manifest.json", {"step": 4, **({"worldSize": written_by} if written_by else {})})
    if refused:
        with pytest.raises(ConfigError, match=f"written by {written_by} processes, this run has {now}"):
            check_same_world_size(storage, uri, now)
    else:
        check_same_world_size(storage, uri, now)
