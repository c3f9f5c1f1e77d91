"""method.full's strategies on the tiny model (real torch, CPU): gradual unfreezing (which blocks train
when, also after a resume), L2-SP (penalty and gradient against hand computation), layer-wise learning
rates (the optimizer's groups), tied embeddings (never silently frozen), and the rules that refuse them."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_config, upload_dataset

from finetune_trainer import config as cfg
from finetune_trainer import engines, run, validation
from finetune_trainer.methods import full, unfreezing
from finetune_trainer.methods.l2sp import L2SP
from finetune_trainer.run import execute
from finetune_trainer.testing import tiny

BLOCKS = 4


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.train_tokenizer()


def tiny_model(tokenizer, tied: bool = False):
    model = tiny.build_model(tokenizer, "llama", layers=BLOCKS)
    if tied:
        model.config.tie_word_embeddings = True
        model.tie_weights()
        assert model.lm_head.weight is model.get_input_embeddings().weight
    return model


def method(**full_settings) -> cfg.Method:
    return cfg.Method(type="full", full=full_settings)


def trainable_blocks(model) -> list[int]:
    return [i for i, block in enumerate(model.model.layers) if all(p.requires_grad for p in block.parameters())]


# ---- gradual unfreezing ------------------------------------------------------------------------

SCHEDULE_CASES = [
    # (start, per release, floor, everySteps, everyEpochs, epoch starts, {step: top blocks})
    ("every 3 steps", 1, 1, 0, 3, None, (), {0: 1, 2: 1, 3: 2, 5: 2, 6: 3, 9: 4, 100: 4}),
    ("two per release", 1, 2, 0, 2, None, (), {0: 1, 1: 1, 2: 3, 4: 4, 50: 4}),
    ("floor stops it", 1, 1, 2, 1, None, (), {0: 1, 1: 2, 2: 2, 10: 2}),
    ("per epoch", 2, 1, 0, None, 1, (0, 5, 10, 15), {0: 2, 4: 2, 5: 3, 9: 3, 10: 4, 15: 4}),
    ("every 2 epochs over stages", 1, 1, 0, None, 2, (0, 3, 6, 8, 10), {0: 1, 5: 1, 6: 2, 9: 2, 10: 3}),
]


@pytest.mark.parametrize("name,start,per,floor,steps,epochs,starts,expected", SCHEDULE_CASES,
                         ids=[c[0] for c in SCHEDULE_CASES])
def test_unfreeze_schedule_is_a_pure_function_of_the_step(name, start, per, floor, steps, epochs, starts, expected):
    schedule = unfreezing.UnfreezeSchedule(BLOCKS, start, per, floor, steps, epochs, starts)
    assert {step: schedule.top_blocks(step) for step in expected} == expected


def test_epoch_starts_of_every_stage():
    # stage 1: 7 steps of 3 per epoch, stage 2 from step 7: 4 steps of 2 per epoch
    assert unfreezing.epoch_starts([(0, 7, 3), (7, 4, 2)]) == (0, 3, 6, 7, 9)


def test_blocks_are_released_from_the_top_and_the_embeddings_last(tokenizer, capsys):
    from finetune_trainer import events

    model = tiny_model(tokenizer)
    m = method(unfreeze={"startTopBlocks": 1, "everySteps": 2})
    full.apply(model, m, "cpu")
    strategies = full.strategies(model, m)
    events.enable(True)
    seen = {}
    for step in range(0, 9):
        strategies.before_step(model, step)
        seen[step] = (trainable_blocks(model), model.model.embed_tokens.weight.requires_grad,
                      model.lm_head.weight.requires_grad and model.model.norm.weight.requires_grad)
    assert seen[0] == ([3], False, True)
    assert seen[2] == ([2, 3], False, True)
    assert seen[4] == ([1, 2, 3], False, True)
    assert seen[6] == ([0, 1, 2, 3], True, True) == seen[8]
    released = [json.loads(l) for l in capsys.readouterr().out.splitlines() if '"event": "unfreeze"' in l]
    assert [(e["step"], e["trainableTopBlocks"]) for e in released] == [(0, 1), (2, 2), (4, 3), (6, 4)]


def test_frozen_blocks_are_in_the_optimizer_but_do_not_move_until_released(tokenizer):
    """The optimizer holds every parameter the schedule will release (its groups never change, so its
    checkpointed state always fits); a block moves only from the step it is released."""
    model = tiny_model(tokenizer)
    m = method(unfreeze={"startTopBlocks": 1, "everySteps": 2, "floor": 1})
    full.apply(model, m, "cpu")
    strategies = full.strategies(model, m)
    hp = cfg.Hyperparameters(learningRate=1e-2, warmupRatio=0.0, scheduler="constant")
    engine = engines.create(model, hp, 10, engines.DistContext(0, 1, 0, torch.device("cpu")), cfg.Distributed(),
                            strategies)
    held = {id(p) for g in engine.optimizer.param_groups for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in held}
    assert names == {n for n, d in strategies.depths.items() if d >= 1}  # not the floor block 0, not the embeddings
    # a group never mixes releases and is tagged with its own (DeepSpeed holds back whole flattened groups by it)
    name_of = {id(p): n for n, p in model.named_parameters()}
    tagged = {name_of[id(p)]: g[engines.RELEASE] for g in engine.optimizer.param_groups for p in g["params"]}
    depth_release = {BLOCKS: 0, 3: 0, 2: 1, 1: 2}  # the head side and block 3 from the start, block 2 next, ...
    assert tagged == {n: depth_release[strategies.depths[n]] for n in names}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    moved_at = {}
    for step in range(4):
        strategies.before_step(model, step)
        loss = model(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.after_backward(True)
        for block in range(BLOCKS):
            name = f"model.layers.{block}.mlp.up_proj.weight"
            if block not in moved_at and not torch.equal(dict(model.named_parameters())[name], before[name]):
                moved_at[block] = step
    assert moved_at == {3: 0, 2: 2}  # block 1 is released at step 4, block 0 never (floor)
    assert torch.equal(model.model.embed_tokens.weight, before["model.embed_tokens.weight"])


def test_start_and_floor_must_fit_the_model(tokenizer):
    from finetune_trainer.errors import ConfigError

    with pytest.raises(ConfigError, match="startTopBlocks 3 \\+ floor 2 exceeds the model's 4 blocks"):
        full.apply(tiny_model(tokenizer), method(unfreeze={"startTopBlocks": 3, "floor": 2, "everySteps": 1}), "cpu")


# ---- tied embeddings ----------------------------------------------------------------------------

@pytest.mark.parametrize("settings", [{"unfreeze": {"startTopBlocks": 1, "everySteps": 5}}, None],
                         ids=["unfreeze", "freezeLayers"])
def test_a_tied_output_head_is_never_frozen(settings, tokenizer, capsys):
    from finetune_trainer import events

    model = tiny_model(tokenizer, tied=True)
    m = method(**settings) if settings else cfg.Method(type="full", freezeLayers=3)
    events.enable(True)
    full.apply(model, m, "cpu")
    assert trainable_blocks(model) == [3]
    assert model.lm_head.weight.requires_grad and model.get_input_embeddings().weight.requires_grad
    assert '"event": "tied-embeddings"' in capsys.readouterr().out
    if settings:
        strategies = full.strategies(model, m)
        strategies.before_step(model, 0)
        assert model.lm_head.weight.requires_grad


def test_a_tied_matrix_gets_the_heads_learning_rate(tokenizer):
    model = tiny_model(tokenizer, tied=True)
    m = method(layerwiseLRDecay=0.5)
    full.apply(model, m, "cpu")
    scales = full.strategies(model, m).lr_scales
    assert scales["model.embed_tokens.weight"] == 1.0 and "lm_head.weight" not in scales  # one parameter, the head's


# ---- layer-wise learning rates --------------------------------------------------------------------

@pytest.mark.parametrize("decay", [0.5, 0.8, 1.0])
def test_layerwise_learning_rates_decay_from_the_head_down(decay, tokenizer):
    model = tiny_model(tokenizer)
    m = method(layerwiseLRDecay=decay)
    full.apply(model, m, "cpu")
    hp = cfg.Hyperparameters(learningRate=1e-3, weightDecay=0.1)
    optimizer = engines.make_optimizer(model, hp, **full.strategies(model, m).optimizer_options())
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())

    def lr(name):
        return lr_of[id(params[name])][0]

    for block in range(BLOCKS):
        assert lr(f"model.layers.{block}.self_attn.q_proj.weight") == pytest.approx(1e-3 * decay ** (BLOCKS - 1 - block))
        assert lr(f"model.layers.{block}.input_layernorm.weight") == pytest.approx(1e-3 * decay ** (BLOCKS - 1 - block))
    assert lr("model.embed_tokens.weight") == pytest.approx(1e-3 * decay ** BLOCKS)
    assert lr("lm_head.weight") == lr("model.norm.weight") == pytest.approx(1e-3)
    # weight decay is still kept off norms
    assert lr_of[id(params["model.norm.weight"])][1] == 0.0 and lr_of[id(params["lm_head.weight"])][1] == 0.1
    assert len(lr_of) == len(params)


def test_the_schedule_scales_every_group_and_the_reported_rate_is_the_heads(tokenizer):
    model = tiny_model(tokenizer)
    m = method(layerwiseLRDecay=0.5)
    full.apply(model, m, "cpu")
    hp = cfg.Hyperparameters(learningRate=1e-3, warmupRatio=0.5, scheduler="linear")
    engine = engines.create(model, hp, 4, engines.DistContext(0, 1, 0, torch.device("cpu")), cfg.Distributed(),
                            full.strategies(model, m))
    ids = torch.tensor([[5, 6, 7, 8]])
    engine.backward(model(input_ids=ids, labels=ids).loss)
    engine.after_backward(True)
    rates = sorted({g["lr"] for g in engine.optimizer.param_groups}, reverse=True)
    assert engine.learning_rate() == pytest.approx(0.5e-3) == rates[0]  # warm-up step 1 of 2
    assert rates[-1] == pytest.approx(0.5e-3 * 0.5 ** BLOCKS)


# ---- L2-SP ------------------------------------------------------------------------------------------

CPU = engines.DistContext(0, 1, 0, torch.device("cpu"))
STILL = cfg.Hyperparameters(learningRate=1e-3, warmupRatio=0.0, scheduler="constant", maxGradNorm=0.0)


def test_l2sp_adds_the_penalty_gradient_before_the_optimizer_steps(tokenizer):
    """The optimizer steps on data gradient + the gradient autograd gives the penalty, and the reported value is
    the penalty computed by hand; blocks gradual unfreezing has not released get neither."""
    model = tiny_model(tokenizer)
    m = method(l2sp={"strength": 0.3}, unfreeze={"startTopBlocks": 2, "everySteps": 10})
    full.apply(model, m, "cpu")
    strategies = full.strategies(model, m)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = engines.create(model, STILL, 4, CPU, cfg.Distributed(), strategies)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    params = dict(model.named_parameters())
    trained = [n for n, p in params.items() if p.requires_grad]
    by_hand = 0.3 * sum(float(((params[n].detach() - base[n]) ** 2).sum()) for n in trained)
    penalty = 0.3 * sum(((params[n] - base[n]) ** 2).sum() for n in trained)
    penalty.backward()
    autograd = {n: params[n].grad.clone() for n in trained}
    data = {n: torch.randn_like(params[n]) for n in trained}
    model.zero_grad(set_to_none=True)
    for n in trained:
        params[n].grad = data[n].clone()
    stepped = {}
    engine.optimizer.register_step_pre_hook(  # runs after L2-SP's hook: what AdamW is about to use
        lambda optimizer, args, kwargs: stepped.update({n: p.grad.clone() for n, p in params.items() if p.grad is not None}))
    engine.optimizer.step()
    assert strategies.l2sp.value(CPU.device) == pytest.approx(by_hand, rel=1e-5)
    assert sorted(stepped) == sorted(trained)  # frozen blocks: no gradient, no penalty
    for n in trained:
        assert torch.allclose(stepped[n], data[n] + autograd[n], atol=1e-6), n


def test_l2sp_anchors_only_what_will_train_and_can_keep_them_on_cpu(tokenizer, capsys):
    model = tiny_model(tokenizer)
    m = method(l2sp={"strength": 1.0, "anchorDevice": "cpu"}, unfreeze={"startTopBlocks": 1, "everySteps": 1,
                                                                          "floor": 2})
    full.apply(model, m, "cpu")
    strategies = full.strategies(model, m)
    engines.create(model, STILL, 4, CPU, cfg.Distributed(), strategies)
    never_trained = ("model.layers.0.", "model.layers.1.", "model.embed_tokens")
    will_train = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(never_trained))
    assert strategies.l2sp.anchored_elements == will_train < sum(p.numel() for p in model.parameters())
    assert all(a.device.type == "cpu" and a.dtype == torch.float32 for a in strategies.l2sp.anchors)
    anchor_events = [json.loads(l) for l in capsys.readouterr().out.splitlines() if '"l2sp-anchor"' in l]
    assert [(e["anchoredElements"], e["partitioned"], e["device"]) for e in anchor_events] == [(will_train, False, "cpu")]


def test_l2sp_keeps_its_base_anchors_when_a_later_stage_creates_a_new_engine(tokenizer):
    """Sequential stages create one engine per stage on the weights the last one trained: the anchors stay the
    base weights (bound again by position), and an engine stepping other shapes is an error."""
    model = tiny_model(tokenizer)
    m = method(l2sp={"strength": 1.0})
    full.apply(model, m, "cpu")
    strategies = full.strategies(model, m)
    base = {id(p): p.detach().clone() for p in model.parameters()}
    engines.create(model, STILL, 4, CPU, cfg.Distributed(), strategies)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    second = engines.create(model, STILL, 4, CPU, cfg.Distributed(), strategies)
    stepped = [p for group in second.optimizer.param_groups for p in group["params"]]
    assert len(stepped) == len(strategies.l2sp.anchors) == len(base)
    assert all(torch.equal(a, base[id(p)]) for a, p in zip(strategies.l2sp.anchors, stepped))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    second.optimizer.step()
    assert strategies.l2sp.value(CPU.device) == pytest.approx(sum(0.25 * p.numel() for p in base.values()), rel=1e-4)

    other = L2SP(1.0)
    other.anchors = [torch.zeros(3)]
    with pytest.raises(RuntimeError, match="other shapes"):
        other.attach(second.optimizer, lambda: [p for p in model.parameters()], partitioned=False)


def distance_after_training(tokenizer, strength: float | None) -> float:
    """The squared distance to the base weights after 10 AdamW steps on one sequence, with L2-SP of that strength
    (None: without L2-SP)."""
    model = tiny_model(tokenizer)
    m = method(**({"l2sp": {"strength": strength}} if strength is not None else {"layerwiseLRDecay": 1.0}))
    full.apply(model, m, "cpu")
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    hp = cfg.Hyperparameters(learningRate=1e-2, warmupRatio=0.0, scheduler="constant", maxGradNorm=0.0)
    engine = engines.create(model, hp, 10, CPU, cfg.Distributed(), full.strategies(model, m))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    for _ in range(10):
        engine.backward(model(input_ids=ids, labels=ids).loss)
        engine.after_backward(True)
    return sum(float(((p.detach() - base[n]) ** 2).sum()) for n, p in model.named_parameters())


@pytest.fixture(scope="module")
def unpenalised_distance(tokenizer) -> float:
    distance = distance_after_training(tokenizer, None)
    assert distance > 1.0  # the steps without L2-SP do move the weights: the comparison means something
    return distance


L2SP_CASES = [  # (strength, the largest share of the distance without L2-SP that the distance with it may be)
    (0.1, 0.1),   # measured: about 0.06 (Adam's steps are about lr whatever the gradient's size: the penalty's
    (50.0, 0.1),  # gradient soon outweighs the loss's and turns the weights back); 50: about 0.014
]


@pytest.mark.parametrize("strength,share", L2SP_CASES)
def test_l2sp_keeps_the_weights_near_the_base(strength, share, unpenalised_distance, tokenizer):
    """The same steps with L2-SP end much nearer the base weights than without, but not on them (they train)."""
    distance = distance_after_training(tokenizer, strength)
    assert 0.0 < distance < share * unpenalised_distance, (distance, unpenalised_distance)


# ---- the rules ----------------------------------------------------------------------------------------

RULE_CASES = [
    ("full settings with lora", {"type": "lora", "full": {"layerwiseLRDecay": 0.9}}, {}, "method.full is only allowed"),
    ("unfreeze and freezeLayers", {"type": "full", "freezeLayers": 1, "full": {"unfreeze": {"everySteps": 2}}}, {},
     "replaces method.freezeLayers"),
    ("no release period", {"type": "full", "full": {"unfreeze": {}}}, {}, "exactly one of everySteps and everyEpochs"),
    ("two release periods", {"type": "full", "full": {"unfreeze": {"everySteps": 2, "everyEpochs": 1}}}, {},
     "exactly one of everySteps and everyEpochs"),
    ("unfreeze with deepspeed", {"type": "full", "full": {"unfreeze": {"everySteps": 2}}},
     {"engine": "deepspeed"}, None),
    ("l2sp with zero-3", {"type": "full", "full": {"l2sp": {"strength": 0.1}}},
     {"engine": "deepspeed", "zeroStage": 3}, None),
    ("l2sp and unfreeze with deepspeed", {"type": "full", "full": {"l2sp": {"strength": 0.1}, "unfreeze": {
        "everySteps": 2}}}, {"engine": "deepspeed", "zeroStage": 3}, None),
    ("layerwise decay with deepspeed", {"type": "full", "full": {"layerwiseLRDecay": 0.9}}, {"engine": "deepspeed"}, None),
    ("everything with ddp", {"type": "full", "full": {"unfreeze": {"everyEpochs": 1, "floor": 1},
                                                     "l2sp": {"strength": 0.1}, "layerwiseLRDecay": 0.9}}, {}, None),
]


@pytest.mark.parametrize("name,method_doc,distributed,problem", RULE_CASES, ids=[c[0] for c in RULE_CASES])
def test_rules_of_the_full_strategies(name, method_doc, distributed, problem):
    config = cfg.TrainerConfig.model_validate({
        "job": {"namespace": "a", "name": "b"}, "model": {"uri": "s3://bkt/m/"}, "output": {"uri": "s3://bkt/o/"},
        "datasets": [{"uri": "s3://bkt/d.jsonl"}], "method": method_doc, "distributed": distributed})
    found = validation.problems(config)
    if problem is None:
        assert found == []
    else:
        assert any(problem in p for p in found), found


# ---- end to end ------------------------------------------------------------------------------------

def step_events(out: str) -> list[dict]:
    return [json.loads(l) for l in out.splitlines() if l.startswith('{"event": "step"')]


STRATEGIES = {"unfreeze": {"startTopBlocks": 1, "everySteps": 4}, "l2sp": {"strength": 0.01},
              "layerwiseLRDecay": 0.8}


def strategies_config(storage, model_bucket, bucket, s3_endpoint, output: str, unfreeze: dict | None = None,
                      batch_size: int = 2, **overrides):
    ds = upload_dataset(storage, bucket, "chat", "chat", 24)
    return make_config(bucket, model_bucket + "llama/", s3_endpoint, [ds],
                       method={"type": "full", "full": {**STRATEGIES, **({"unfreeze": unfreeze} if unfreeze else {})}},
                       hyperparameters={"maxSteps": 10, "learningRate": 2e-3, "batchSize": batch_size,
                                        "scheduler": "cosine", "warmupRatio": 0.1},
                       output={"uri": bucket + output}, **overrides)


def test_a_run_with_every_strategy_trains_and_reports_them(storage, model_bucket, bucket, s3_endpoint, tmp_path, capsys):
    config = strategies_config(storage, model_bucket, bucket, s3_endpoint, "strategies/")
    summary = execute(config, tmp_path)
    assert summary.exit_code == 0, summary.result.message
    steps = step_events(capsys.readouterr().out)
    # the tiny llama has 2 blocks: one at the start, both (and the embeddings) from step 5
    assert [e["trainableTopBlocks"] for e in steps] == [1] * 4 + [2] * 6
    assert all(e["l2spPenalty"] >= 0 for e in steps) and steps[-1]["l2spPenalty"] > 0
    losses = summary.losses["main"]
    assert sum(losses[-3:]) < sum(losses[:3])


RESUME_CASES = [  # (unfreeze, batch size): the release comes after the stop at step 3 or 4, within the 10 steps
    ("every 4 steps", {"startTopBlocks": 1, "everySteps": 4}, 2),         # the release at step 5
    ("every epoch", {"startTopBlocks": 1, "everyEpochs": 1}, 4),          # 22 or 23 rows: 6 steps an epoch
]


@pytest.mark.parametrize("name,unfreeze,batch_size", RESUME_CASES, ids=[c[0] for c in RESUME_CASES])
def test_a_resumed_run_has_the_same_trainable_blocks_and_losses_at_every_step(name, unfreeze, batch_size, storage,
                                                                               model_bucket, bucket, s3_endpoint,
                                                                               tmp_path, capsys, monkeypatch):
    def config_of(output: str):
        return strategies_config(storage, model_bucket, bucket, s3_endpoint, output, unfreeze, batch_size,
                                 checkpoint={"everySteps": 3})

    reference = execute(config_of("uninterrupted/"), tmp_path / "ref")
    assert reference.exit_code == 0, reference.result.message
    expected = {e["step"]: e["trainableTopBlocks"] for e in step_events(capsys.readouterr().out)}
    release = min(step for step, blocks in expected.items() if blocks > expected[1])  # the first step after one

    config = config_of("interrupted/")

    class PreemptedAfterStep3(run.Preemption):
        """SIGTERM as step 3 ends (before the release): the run checkpoints and stops at the next step."""

        def __init__(self):
            super().__init__()
            emit = run.events.emit

            def watch(event, **fields):
                emit(event, **fields)
                if event == "step" and fields["step"] == 3:
                    self.requested.set()

            monkeypatch.setattr(run.events, "emit", watch)

    monkeypatch.setattr(run, "Preemption", PreemptedAfterStep3)
    stopped = execute(config, tmp_path / "first")
    assert stopped.exit_code != 0
    monkeypatch.undo()
    first = {e["step"]: e["trainableTopBlocks"] for e in step_events(capsys.readouterr().out)}

    resumed = execute(config, tmp_path / "second")
    assert resumed.exit_code == 0, resumed.result.message
    second = {e["step"]: e["trainableTopBlocks"] for e in step_events(capsys.readouterr().out)}
    stopped_at = max(first)  # the stop is honoured at the next step boundary
    assert resumed.resumed_from_step == stopped_at < release  # the resumed run makes the release
    assert sorted(second) == list(range(stopped_at + 1, 11))
    assert {**first, **second} == expected
    assert resumed.losses["main"][stopped_at:] == pytest.approx(reference.losses["main"][stopped_at:], rel=1e-4,
                                                                abs=1e-4)
