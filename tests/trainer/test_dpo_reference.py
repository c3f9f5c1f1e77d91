"""A DPO or KTO stage compares the policy with a reference that is the model as it was when the stage started
(TRL's DPOTrainer and KTOTrainer), so before the first update every margin (every log-ratio) is 0. Three things
in run.py keep the two comparable, for every objective that needs a reference, each checked here through
`execute` on the tiny model, for dpo and kto:

- dropout is off while such a stage trains (and only then): the policy's log-probs are not noisy, and a
  stage after it trains with the model's configured dropout again, as a run resumed into that stage does;
- the reference log-probs are computed under the engine's autocast, the precision the policy trains in;
- fresh prefix/prompt tuning (random virtual tokens) takes the base model as its reference, as TRL's
  disabled adapter does, not the base model with random virtual tokens.

The recorders wrap what run.py calls (run_loop, attach_reference_log_probs) and look at the model and the
autocast state at the moment the reference and the policy log-probs are computed."""

from __future__ import annotations

import dataclasses
import math
import threading

import pytest
import torch
from conftest import make_config, upload_dataset

from finetune_trainer import engines, exit_codes, objectives, run

LORA_WITH_DROPOUT = {"type": "lora", "lora": {"rank": 8, "alpha": 16, "dropout": 0.1}}


def autocast_state() -> tuple[bool, torch.dtype | None]:
    enabled = torch.is_autocast_enabled("cpu")
    return enabled, torch.get_autocast_dtype("cpu") if enabled else None


def dropout_rates(model) -> set[float]:
    return {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}


def dropout_by_module(model) -> dict[str, float]:
    return {name: m.p for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}


# (objective, its dataset format, the first step's loss when the policy is its reference: log 2 per DPO pair,
# 1 - sigmoid(0) per KTO row)
REFERENCE_OBJECTIVES = {"dpo": ("preference", math.log(2)), "kto": ("feedback", 0.5)}


def pair_log_probs(model, items, pad_id: int, objective: str) -> list[float]:
    """The two log-probs per item the objective's reference holds ([chosen, rejected], [completion, mismatched
    completion]): fp32, eval mode, one batch."""
    spec = objectives.get(objective)
    was_training = model.training
    model.eval()
    batch = spec.collate(items, pad_id)
    batch.pop("reference_log_probs", None)
    with torch.no_grad():
        first, second = spec.reference_log_probs(model, batch)
    model.train(was_training)
    return [value for pair in zip(first.tolist(), second.tolist()) for value in pair]


@dataclasses.dataclass
class Stage:
    """What one stage of a run did, as seen from run.py's calls."""

    objective: str
    reference_autocast: set = dataclasses.field(default_factory=set)   # autocast states of the reference forwards
    references: list[float] = dataclasses.field(default_factory=list)  # [chosen, rejected] per row, as attached
    policy_at_start: list[float] = dataclasses.field(default_factory=list)  # the trained model's, as training starts
    items: list = dataclasses.field(default_factory=list)
    pad_id: int = 0
    loss_calls: list[dict] = dataclasses.field(default_factory=list)  # per policy loss: mode, dropout, autocast


@pytest.fixture
def recorded(monkeypatch) -> list[Stage]:
    """The stages of the next `execute`, in order."""
    stages: list[Stage] = []
    real_attach, real_loop = run.attach_reference_log_probs, run.run_loop

    def attach(model, items, collate, log_probs_fn, pad_id, *args, **kwargs):
        stage = Stage("reference", items=items, pad_id=pad_id)
        stages.append(stage)

        def recording_log_probs(m, batch):
            stage.reference_autocast.add(autocast_state())
            return log_probs_fn(m, batch)

        real_attach(model, items, collate, recording_log_probs, pad_id, *args, **kwargs)
        stage.references = [value for item in items for value in item.reference]

    def loop(engine, objective, *args, **kwargs):
        if stages and stages[-1].objective == "reference" and not stages[-1].loss_calls:
            stage = stages[-1]
            stage.objective = objective.name
            stage.policy_at_start = pair_log_probs(engine.module, stage.items, stage.pad_id, objective.name)
        else:
            stage = Stage(objective.name)
            stages.append(stage)

        def recording_loss(model, batch, hyperparameters):
            stage.loss_calls.append({"training": model.training, "dropout": dropout_rates(model),
                                     "modules": dropout_by_module(model), "autocast": autocast_state()})
            return objective.loss(model, batch, hyperparameters)

        return real_loop(engine, dataclasses.replace(objective, loss=recording_loss), *args, **kwargs)

    monkeypatch.setattr(run, "attach_reference_log_probs", attach)
    monkeypatch.setattr(run, "run_loop", loop)
    return stages


def run_config(storage, bucket, model_uri, endpoint, stages: list[tuple[str, str]], method: dict, steps: int,
               output: str = "out/", **hyperparameters):
    """A run of the given (objective, dataset format) stages, `steps` steps each, without base evaluation; 9 rows
    per dataset (8 train, 1 validation)."""
    datasets = {fmt: upload_dataset(storage, bucket, fmt, fmt, 9) for _, fmt in stages}
    hyperparameters = {"maxSteps": steps, "learningRate": 1e-2, "batchSize": 4, **hyperparameters}
    common = {"method": method, "hyperparameters": hyperparameters, "evaluation": {"compareToBase": False},
              "output": {"uri": bucket + output}}
    if len(stages) == 1:
        return make_config(bucket, model_uri, endpoint, [datasets[stages[0][1]]], objective=stages[0][0], **common)
    return make_config(bucket, model_uri, endpoint, [], stages=[
        {"name": f"{objective}-{i}", "datasets": [datasets[fmt]], "objective": objective}
        for i, (objective, fmt) in enumerate(stages)], **common)


DROPOUT_CASES = [  # (stages, the dropout rates each stage's policy trains with); REF: the objective under test
    ("alone", [("REF", None)], [{0.0}]),
    ("after sft", [("sft", "instruction"), ("REF", None)], [{0.1}, {0.0}]),
]


def with_objective(stages, objective: str) -> list[tuple[str, str]]:
    """The stages with REF replaced by the objective (and its dataset format)."""
    return [(objective, REFERENCE_OBJECTIVES[objective][0]) if o == "REF" else (o, fmt) for o, fmt in stages]


@pytest.mark.parametrize("objective", REFERENCE_OBJECTIVES)
@pytest.mark.parametrize("name,stages,rates", DROPOUT_CASES, ids=[c[0] for c in DROPOUT_CASES])
def test_a_reference_stage_trains_with_dropout_off_and_other_stages_keep_it(name, stages, rates, objective, recorded,
                                                                            storage, model_bucket, bucket,
                                                                            s3_endpoint, tmp_path):
    stages = with_objective(stages, objective)
    config = run_config(storage, bucket, model_bucket + "llama/", s3_endpoint, stages, LORA_WITH_DROPOUT, 1)
    summary = run.execute(config, tmp_path)
    assert summary.exit_code == 0, summary.result.message
    assert [s.objective for s in recorded] == [objective for objective, _ in stages]
    for stage, expected in zip(recorded, rates):
        assert stage.loss_calls and all(call["training"] for call in stage.loss_calls)
        assert [call["dropout"] for call in stage.loss_calls] == [expected] * len(stage.loss_calls), stage.objective
    # The policy is its reference at the first step: every log-ratio 0, the loss log 2 per DPO pair, 1 - sigmoid(0)
    # per KTO row. After the SFT stage the LoRA weights are no longer 0, so dropout on their path would move the
    # policy's log-probs.
    reference_stage = config.stages[-1].name if config.stages else "main"
    assert summary.losses[reference_stage][0] == pytest.approx(REFERENCE_OBJECTIVES[objective][1], abs=1e-5)


@pytest.fixture
def preempt(monkeypatch) -> threading.Event:
    """Setting it is what SIGTERM does to a run: it checkpoints and stops at the end of the current step."""
    requested = threading.Event()

    class Preemption:
        def __init__(self):
            self.requested = requested

        def restore(self) -> None:
            pass

    monkeypatch.setattr(run, "Preemption", Preemption)
    return requested


def test_a_stage_after_dpo_trains_with_the_models_dropout_as_a_resumed_run_does(recorded, preempt, monkeypatch,
                                                                                storage, model_bucket, bucket,
                                                                                s3_endpoint, tmp_path):
    """DPO then SFT: the SFT stage trains with the configured dropout of every dropout module, the rates a run
    resumed into that stage has (it builds a fresh model and skips the DPO stage), not with DPO's dropout off."""
    stages = [("dpo", "preference"), ("sft", "instruction")]

    def config(output: str):
        return run_config(storage, bucket, model_bucket + "llama/", s3_endpoint, stages, LORA_WITH_DROPOUT, 2,
                          output=output)

    uninterrupted = run.execute(config("uninterrupted/"), tmp_path / "uninterrupted")
    assert uninterrupted.exit_code == 0, uninterrupted.result.message
    dpo_stage, sft_stage = recorded
    assert (dpo_stage.objective, sft_stage.objective) == ("dpo", "sft")
    assert {rate for call in dpo_stage.loss_calls for rate in call["modules"].values()} == {0.0}

    # The same run, preempted in its first SFT step, then resumed in the SFT stage from that checkpoint.
    recording_loop = run.run_loop

    def preempted_in_sft(engine, objective, *args, **kwargs):
        if objective.name == "sft":
            preempt.set()
        return recording_loop(engine, objective, *args, **kwargs)

    monkeypatch.setattr(run, "run_loop", preempted_in_sft)
    interrupted = run.execute(config("interrupted/"), tmp_path / "interrupted")
    assert interrupted.exit_code == exit_codes.PREEMPTED, interrupted.result.message
    preempt.clear()
    monkeypatch.setattr(run, "run_loop", recording_loop)
    del recorded[:]
    resumed = run.execute(config("interrupted/"), tmp_path / "resumed")
    assert resumed.exit_code == 0, resumed.result.message
    [resumed_sft] = recorded  # the DPO stage was done before the checkpoint: not run again
    assert resumed_sft.objective == "sft" and len(resumed_sft.loss_calls) == 1

    fresh = resumed_sft.loss_calls[0]["modules"]
    assert fresh and set(fresh.values()) == {0.1}  # the LoRA dropout of method.lora.dropout
    assert [call["modules"] for call in sft_stage.loss_calls] == [fresh] * 2


@pytest.mark.parametrize("objective", REFERENCE_OBJECTIVES)
def test_the_reference_is_computed_under_the_engines_autocast(objective, recorded, monkeypatch, storage, model_bucket,
                                                              bucket, s3_endpoint, tmp_path):
    """On a GPU the engine trains in bf16 autocast; on CPU the test makes it do so (torch.autocast("cpu", bf16)).
    One micro-batch of all 8 rows, as the reference's one batch, so bf16 rounds the same rows alike; beta 1 makes
    a reference in another precision show in the first loss."""
    monkeypatch.setattr(engines, "resolve_precision", lambda precision, device_type: "bf16")
    config = run_config(storage, bucket, model_bucket + "llama/", s3_endpoint,
                        [(objective, REFERENCE_OBJECTIVES[objective][0])],
                        {"type": "lora", "lora": {"rank": 8, "alpha": 16, "dropout": 0.0}}, 1, batchSize=8,
                        dpoBeta=1.0, ktoBeta=1.0)
    summary = run.execute(config, tmp_path)
    assert summary.exit_code == 0, summary.result.message
    [stage] = recorded
    assert {call["autocast"] for call in stage.loss_calls} == {(True, torch.bfloat16)}
    assert stage.reference_autocast == {(True, torch.bfloat16)}
    # bf16 does change the log-probs: the fp32 ones of the same (untrained) model are not the reference ...
    assert max(abs(a - b) for a, b in zip(stage.references, stage.policy_at_start)) > 1e-3
    # ... and the policy, in bf16, is its reference at the first step.
    assert summary.losses["main"][0] == pytest.approx(REFERENCE_OBJECTIVES[objective][1], abs=1e-5)


VIRTUAL_TOKEN_CASES = [  # (method, stages of the objective under test, per stage: whether its reference is the base)
    ("prefix", {"type": "prefix", "virtualTokens": 4}, 1, [True]),
    ("prompt", {"type": "prompt", "virtualTokens": 4}, 1, [True]),
    # a later stage starts from trained virtual tokens: its reference is the policy as that stage starts
    ("prefix, second stage", {"type": "prefix", "virtualTokens": 4}, 2, [True, False]),
]


@pytest.mark.parametrize("objective", REFERENCE_OBJECTIVES)
@pytest.mark.parametrize("name,method,stage_count,is_base", VIRTUAL_TOKEN_CASES,
                         ids=[c[0] for c in VIRTUAL_TOKEN_CASES])
def test_fresh_virtual_tokens_take_the_base_model_as_reference(name, method, stage_count, is_base, objective, recorded,
                                                                tiny_model_dirs, storage, model_bucket, bucket,
                                                                s3_endpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    stages = [(objective, REFERENCE_OBJECTIVES[objective][0])] * stage_count
    config = run_config(storage, bucket, model_bucket + "llama/", s3_endpoint, stages, method, 1)
    summary = run.execute(config, tmp_path)
    assert summary.exit_code == 0, summary.result.message
    assert [s.objective for s in recorded] == [objective] * len(stages)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"])
    for stage, expect_base in zip(recorded, is_base):
        base_values = pair_log_probs(base, stage.items, stage.pad_id, objective)
        # the case tells the two apart: the virtual tokens (random or trained) change the log-probs
        assert max(abs(a - b) for a, b in zip(base_values, stage.policy_at_start)) > 0.05
        expected = base_values if expect_base else stage.policy_at_start
        assert stage.references == pytest.approx(expected, abs=1e-4)
