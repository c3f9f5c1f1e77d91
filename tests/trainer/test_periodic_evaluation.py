"""Periodic evaluation: with evaluation.everySteps the validation loss is measured during training, progress.json
keeps the history (a search prunes on it), the final evaluation ends it, and a resumed run keeps earlier points."""

from __future__ import annotations

import math

import pytest
from conftest import make_config, upload_dataset

import finetune_trainer.run as run_module
from finetune_trainer import config as cfg
from finetune_trainer import exit_codes
from finetune_trainer.checkpoint import TRAINER_STATE, complete_checkpoints
from finetune_trainer.progress import (eval_history_from_state, eval_history_state, evaluation_due,
                                       with_eval_point)
from finetune_trainer.run import execute
from finetune_trainer.storage import join

DUE_CASES = [
    # (global step, everySteps, last step, due)
    (2, 2, 6, True),
    (3, 2, 6, False),
    (4, 2, 6, True),
    (6, 2, 6, False),  # the final evaluation covers the last step
    (5, 0, 6, False),  # 0: only the final evaluation
    (1, 1, 6, True),
    (10, 5, 12, True),
]


@pytest.mark.parametrize("step,every,last,due", DUE_CASES)
def test_evaluation_is_due_every_n_global_steps_but_not_at_the_last(step, every, last, due):
    assert evaluation_due(step, every, last) is due


def points(*steps: int) -> list[cfg.EvalPoint]:
    return [cfg.EvalPoint(step=s, evalLoss=float(s)) for s in steps]


HISTORY_CASES = [
    ("appended last", points(2, 4), 6, [2, 4, 6]),
    ("first point", [], 2, [2]),
    ("resumed before later points: they are measured again", points(2, 4, 6), 4, [2, 4]),
    ("resumed between points", points(2, 4, 6), 5, [2, 4, 5]),
    ("bounded to the latest", points(*range(1, cfg.MAX_EVAL_HISTORY + 1)), cfg.MAX_EVAL_HISTORY + 1,
     list(range(2, cfg.MAX_EVAL_HISTORY + 2))),
]


@pytest.mark.parametrize("name,history,step,expected", HISTORY_CASES, ids=[c[0] for c in HISTORY_CASES])
def test_a_new_point_replaces_points_at_or_after_its_step_and_the_history_stays_bounded(name, history, step, expected):
    steps_before = [p.step for p in history]
    updated = with_eval_point(history, cfg.EvalPoint(step=step, evalLoss=-1.0))
    assert [p.step for p in updated] == expected
    assert updated[-1].evalLoss == -1.0
    assert [p.step for p in history] == steps_before  # the caller's history is left alone


STATE_CASES = [
    ("no checkpoint", None, []),
    ("checkpoint written before histories were kept", {"stage": 0, "stageStep": 3}, []),
    ("kept history", {"evalHistory": [{"step": 2, "evalLoss": 1.5}, {"step": 4, "evalLoss": 1.25}]}, [2, 4]),
]


@pytest.mark.parametrize("name,state,steps", STATE_CASES, ids=[c[0] for c in STATE_CASES])
def test_the_history_is_restored_from_the_trainer_state(name, state, steps):
    restored = eval_history_from_state(state)
    assert [p.step for p in restored] == steps
    assert eval_history_state(restored) == (state or {}).get("evalHistory", [])


def periodic_config(storage, model_bucket, bucket, s3_endpoint, every: int, output: str, **overrides):
    ds = upload_dataset(storage, bucket, "chat", "chat", 40)
    return make_config(bucket, model_bucket + "llama/", s3_endpoint, [ds], output={"uri": bucket + output},
                       evaluation={"everySteps": every},
                       **{"hyperparameters": {"maxSteps": 6, "learningRate": 1e-2}, **overrides})


def read_progress(storage, config) -> cfg.Progress:
    return cfg.Progress.model_validate(storage.get_json(cfg.progress_uri(config.output.uri, "1")))


@pytest.mark.parametrize("every,steps", [(2, [2, 4, 6]), (4, [4, 6]), (0, [6])])
def test_progress_keeps_the_validation_loss_of_every_n_steps_and_ends_with_the_final_one(
        every, steps, storage, model_bucket, bucket, s3_endpoint, tmp_path):
    config = periodic_config(storage, model_bucket, bucket, s3_endpoint, every, f"every-{every}/")
    summary = execute(config, tmp_path)
    assert summary.exit_code == 0, summary.result.message

    history = read_progress(storage, config).evalHistory
    assert [p.step for p in history] == steps
    assert all(math.isfinite(p.evalLoss) for p in history)
    assert history[-1].evalLoss == pytest.approx(math.log(summary.evaluation.perplexity))
    assert read_progress(storage, config).evalLoss == history[-1].evalLoss
    # Training on the chat rows lowers their validation loss below the untrained model's.
    assert history[-1].evalLoss < math.log(summary.evaluation.basePerplexity)


def test_measuring_does_not_change_the_training(storage, model_bucket, bucket, s3_endpoint, tmp_path):
    """Evaluation turns dropout off and on again and draws no random numbers: the losses are a run's without it."""
    lora = {"type": "lora", "lora": {"rank": 4, "alpha": 8, "dropout": 0.1}}
    runs = [execute(periodic_config(storage, model_bucket, bucket, s3_endpoint, every, f"same-{every}/", method=lora,
                                    hyperparameters={"maxSteps": 4, "learningRate": 1e-2}), tmp_path / str(every))
            for every in (0, 1)]
    assert [r.exit_code for r in runs] == [0, 0]
    assert runs[1].losses["main"] == runs[0].losses["main"]
    assert runs[1].evaluation.perplexity == runs[0].evaluation.perplexity


def test_each_point_is_in_progress_json_before_the_next_step(storage, model_bucket, bucket, s3_endpoint, tmp_path,
                                                              monkeypatch):
    """The operator prunes on progress.json: a point is written at once, not at the next progress interval."""
    config = periodic_config(storage, model_bucket, bucket, s3_endpoint, 2, "at-once/",
                             runtime={"progressIntervalSeconds": 3600})
    seen: dict[int, list[int] | None] = {}
    original = run_module.run_loop

    def run_loop_reading_progress(*args, **kwargs):
        *rest, after_step = args

        def after_step_then_read(report):
            after_step(report)
            document = storage.get_json(cfg.progress_uri(config.output.uri, "1"))
            seen[report.step] = None if document is None else [p["step"] for p in document["evalHistory"]]

        return original(*rest, after_step_then_read, **kwargs)

    monkeypatch.setattr(run_module, "run_loop", run_loop_reading_progress)
    assert execute(config, tmp_path).exit_code == 0
    # Nothing is written before the first evaluation (the interval is an hour), then each point at once.
    assert seen == {1: None, 2: [2], 3: [2], 4: [2, 4], 5: [2, 4], 6: [2, 4]}


def test_a_resumed_run_keeps_the_points_measured_before_its_checkpoint(storage, model_bucket, bucket, s3_endpoint,
                                                                        tmp_path, monkeypatch):
    config = periodic_config(storage, model_bucket, bucket, s3_endpoint, 2, "resumed/",
                             hyperparameters={"maxSteps": 8, "learningRate": 1e-2})
    original = run_module.run_loop

    def run_loop_preempted_at_step_5(*args, **kwargs):
        engine, objective, data, hp, ctx, pad_id, start, total, seed, _, after_step = args
        steps = iter(range(start + 1, total + 1))
        return original(engine, objective, data, hp, ctx, pad_id, start, total, seed, lambda: next(steps) == 5,
                        after_step, **kwargs)

    monkeypatch.setattr(run_module, "run_loop", run_loop_preempted_at_step_5)
    first = execute(config, tmp_path / "first")
    monkeypatch.undo()
    assert first.exit_code == exit_codes.PREEMPTED, first.result.message
    before = read_progress(storage, config).evalHistory
    assert [p.step for p in before] == [2, 4]

    prefix = cfg.checkpoint_prefix(None, config.output.uri, "1")
    (step, checkpoint), = complete_checkpoints(storage, prefix)
    state = storage.get_json(join(checkpoint, TRAINER_STATE))
    assert step == 5 and [p["step"] for p in state["evalHistory"]] == [2, 4]

    # Only the checkpoint can hold the earlier points now.
    storage.delete_prefix(cfg.progress_uri(config.output.uri, "1"))
    resumed = execute(config, tmp_path / "second")
    assert resumed.exit_code == 0 and resumed.resumed_from_step == 5, resumed.result.message
    after = read_progress(storage, config).evalHistory
    assert [p.step for p in after] == [2, 4, 6, 8]
    assert after[:2] == before
    assert after[-1].evalLoss == pytest.approx(math.log(resumed.evaluation.perplexity))
