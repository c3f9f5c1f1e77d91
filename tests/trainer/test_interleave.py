"""Interleaved multi-task (preprocessing.multiTask): micro-batch sources, shares, per-dataset losses, resume."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from conftest import make_config, upload_dataset

from finetune_trainer import config as cfg
from finetune_trainer import engines, exit_codes, objectives
from finetune_trainer import run as run_module
from finetune_trainer.data import interleave, mixing
from finetune_trainer.data.pipeline import PreparedData
from finetune_trainer.data.tokenize import Sequence
from finetune_trainer.distributed import DistContext
from finetune_trainer.run import execute
from finetune_trainer.testing import tiny
from finetune_trainer.train import run_loop

CPU = DistContext(0, 1, 0, torch.device("cpu"))


@pytest.mark.parametrize("sizes,weights,temperature,expected", [
    ([100, 10], [1, 1], None, [0.5, 0.5]),
    ([100, 10], [3, 1], None, [0.75, 0.25]),
    ([100, 10], [1, 1], 1.0, [100 / 110, 10 / 110]),
    ([100, 1], [1, 1], 2.0, [10 / 11, 1 / 11]),          # sqrt(100) : sqrt(1)
    ([100, 10], [1, 3], 1.0, [100 / 130, 30 / 130]),      # weight x rows^(1/T)
    ([8, 8, 8], [1, 1, 2], 5.0, [0.25, 0.25, 0.5]),
    ([10**9, 10], [1, 1], 0.1, [1.0, 0.0]),               # no overflow for a small temperature
])
def test_shares_by_weight_or_temperature_scaled_size(sizes, weights, temperature, expected):
    shares = mixing.shares(sizes, weights, temperature)
    assert shares == pytest.approx(expected, abs=1e-12)
    assert sum(shares) == pytest.approx(1.0)


INTERLEAVE_CASES = [  # (sizes, shares, world size, batch, accumulation)
    ([10, 30], [0.5, 0.5], 1, 4, 1),
    ([10, 30], [0.25, 0.75], 2, 2, 2),
    ([3, 40, 7], [0.2, 0.5, 0.3], 2, 4, 3),   # dataset 0 is smaller than a global micro-batch (8)
    ([25], [1.0], 1, 3, 4),
]


@pytest.mark.parametrize("sizes,shares,world,batch,accumulation", INTERLEAVE_CASES)
def test_each_micro_batch_comes_from_one_dataset_in_proportion_to_the_shares(sizes, shares, world, batch,
                                                                              accumulation):
    n = sum(sizes)
    offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    per_rank = [interleave.epoch_micro_batches(sizes, shares, 2, 42, rank, world, batch, accumulation)
                for rank in range(world)]
    count = len(per_rank[0])
    assert count % accumulation == 0 and all(len(r) == count for r in per_rank)
    # Every rank trains on the same dataset at the same micro-batch.
    sources = [b.source for b in per_rank[0]]
    assert all([b.source for b in r] == sources for r in per_rank)
    assert Counter(sources) == Counter({i: c for i, c in enumerate(mixing.split(count, shares)) if c})
    for k in range(count):
        source = sources[k]
        real = [i for r in per_rank for i in r[k].indices if i < n]
        assert all(len(r[k].indices) == batch for r in per_rank)
        assert all(offsets[source] <= i < offsets[source + 1] for i in real)  # only this dataset's items
        assert len(real) == len(set(real)) == min(batch * world, sizes[source])  # no row twice in a micro-batch
    # A dataset served at least its size in an epoch sees every one of its rows.
    for source, size in enumerate(sizes):
        served = Counter(i for r in per_rank for b in r for i in b.indices if b.source == source and i < n)
        if sum(served.values()) >= size:
            assert set(served) == set(range(offsets[source], offsets[source + 1]))


def test_the_order_is_seeded_and_fresh_each_epoch():
    plan = lambda seed, epoch: [(b.source, b.indices) for b in  # noqa: E731
                                interleave.epoch_micro_batches([20, 20], [0.5, 0.5], epoch, seed, 0, 1, 2, 1)]
    assert plan(1, 0) == plan(1, 0)
    assert plan(1, 0) != plan(2, 0) and plan(1, 0) != plan(1, 1)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.train_tokenizer()


def sequences(seed: int, n: int, vocab: int) -> list[Sequence]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 4 + (i * 7 + seed) % 20  # uneven target counts
        ids = torch.randint(5, vocab, (length,), generator=generator).tolist()
        out.append(Sequence(ids, [0] * (length // 3) + [1] * (length - length // 3)))
    return out


def interleaved_data(vocab: int, seed: int = 7) -> PreparedData:
    a, b = sequences(0, 9, vocab), sequences(1, 15, vocab)
    return PreparedData(a + b, [], {}, [a, b], [1.0, 2.0], seed, None, True, [len(a), len(b)])


def hyperparameters(**overrides) -> cfg.Hyperparameters:
    return cfg.Hyperparameters(**{"batchSize": 2, "gradientAccumulationSteps": 2, "learningRate": 1e-2,
                                  "warmupRatio": 0.0, "scheduler": "constant", "maxGradNorm": 0.0, **overrides})


def loop(tokenizer, data, hp, start: int, total: int, engine_hook=None) -> list:
    torch.manual_seed(0)
    model = tiny.build_model(tokenizer, "llama")
    engine = engines.DDPEngine(model, hp, total, CPU, "fp32")
    if engine_hook:
        engine_hook(engine)
    reports = []
    run_loop(engine, objectives.get("sft"), data, hp, CPU, tokenizer.pad_token_id or 0, start, total, data.seed,
             lambda: False, reports.append)
    return reports


def test_per_dataset_losses_are_each_datasets_own_and_add_up_to_the_step_loss(tokenizer):
    data, hp = interleaved_data(tokenizer.vocab_size), hyperparameters()
    sft = objectives.get("sft")
    torch.manual_seed(0)
    fresh = tiny.build_model(tokenizer, "llama")
    reports = loop(tokenizer, data, hp, 0, 6)
    plan = interleave.epoch_micro_batches(data.source_sizes, data.weights, 0, data.seed, 0, 1, 2, 2)
    for report in reports:
        slots = plan[(report.step - 1) * 2:report.step * 2]
        assert report.sources == [b.source for b in slots]
        assert set(report.dataset_losses) == set(report.sources)
        units = Counter()
        for b in slots:
            units[b.source] += sft.units(sft.collate([data.train[i] for i in b.indices if i < len(data.train)], 0))
        weighted = sum(report.dataset_losses[s] * u for s, u in units.items()) / sum(units.values())
        assert weighted == pytest.approx(report.loss, rel=1e-5)
    # Before the first update: each dataset's loss is the untrained model's mean loss on that dataset's items.
    first = reports[0]
    for source in set(first.sources):
        items = [data.train[i] for b in plan[:2] if b.source == source for i in b.indices if i < len(data.train)]
        batch = sft.collate(items, 0)
        fresh.train()
        with torch.no_grad():
            loss, _ = sft.loss(fresh, batch, hp)
        assert first.dataset_losses[source] == pytest.approx(float(loss) / sft.units(batch), rel=1e-4)


def test_interleaving_keeps_the_step_gradient_token_normalised(tokenizer):
    """The step's gradient is that of one batch of all its micro-batches' rows, each target token weighing the same."""
    data, hp = interleaved_data(tokenizer.vocab_size, seed=3), hyperparameters(learningRate=1e-9)
    captured = {}

    def capture(engine):
        original = engine.after_backward

        def after_backward(boundary):
            if boundary:
                captured.update({n: p.grad.clone() for n, p in engine.module.named_parameters() if p.grad is not None})
            original(boundary)

        engine.after_backward = after_backward

    report, = loop(tokenizer, data, hp, 0, 1, capture)
    assert len(set(report.sources)) == 2  # this seed's first step takes one micro-batch of each dataset
    plan = interleave.epoch_micro_batches(data.source_sizes, data.weights, 0, data.seed, 0, 1, 2, 2)
    items = [data.train[i] for b in plan[:2] for i in b.indices if i < len(data.train)]
    sft = objectives.get("sft")
    torch.manual_seed(0)
    model = tiny.build_model(tokenizer, "llama")
    model.train()
    batch = sft.collate(items, 0)
    loss, _ = sft.loss(model, batch, hp)
    (loss / sft.units(batch)).backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert captured.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(captured[name], grad, rtol=1e-4, atol=1e-6)


def test_a_resumed_loop_takes_the_same_sources_as_an_uninterrupted_one(tokenizer):
    data = interleaved_data(tokenizer.vocab_size)
    hp = hyperparameters(gradientAccumulationSteps=1)  # 12 steps per epoch: the runs cross an epoch boundary
    whole = loop(tokenizer, data, hp, 0, 16)
    resumed = loop(tokenizer, data, hp, 9, 16)
    assert [r.step for r in resumed] == list(range(10, 17))
    assert [r.sources for r in resumed] == [r.sources for r in whole[9:]]
    assert {s for r in whole for s in r.sources} == {0, 1}


def interleave_config(storage, model_bucket, bucket, s3_endpoint, output: str, **overrides):
    datasets = [upload_dataset(storage, bucket, "chat", "chat", 24),
                upload_dataset(storage, bucket, "inst", "instruction", 12)]
    return make_config(bucket, model_bucket + "llama/", s3_endpoint, datasets,
                       preprocessing={"multiTask": {"strategy": "interleave", "temperature": 2.0}},
                       hyperparameters={"maxSteps": 8, "batchSize": 2, "learningRate": 1e-2},
                       checkpoint={"everySteps": 1000, "keep": 2}, output={"uri": bucket + output},
                       evaluation={"compareToBase": False}, **overrides)


def test_interleaved_job_reports_each_datasets_loss_and_resumes_at_the_same_source(storage, model_bucket, bucket,
                                                                                    s3_endpoint, tmp_path,
                                                                                    monkeypatch):
    original = run_module.run_loop
    sources: dict[str, dict[int, list[int]]] = {"whole": {}, "first": {}, "second": {}}

    def recording(name, preempt_at=None):
        def run_loop_recording(*args, **kwargs):
            engine, objective, data, hp, ctx, pad_id, start, total, seed, stop, after_step = args
            steps = iter(range(start + 1, total + 1))

            def after(report):
                sources[name][report.step] = report.sources
                after_step(report)

            return original(engine, objective, data, hp, ctx, pad_id, start, total, seed,
                            (lambda: next(steps) == preempt_at) if preempt_at else stop, after, **kwargs)
        return run_loop_recording

    config = interleave_config(storage, model_bucket, bucket, s3_endpoint, "whole/")
    monkeypatch.setattr(run_module, "run_loop", recording("whole"))
    whole = execute(config, tmp_path / "whole")
    assert whole.exit_code == 0, whole.result.message
    progress = storage.get_json(cfg.progress_uri(config.output.uri, "1"))
    records = progress["datasetLosses"]
    assert [(r["stage"], r["index"], r["uri"]) for r in records] == [("main", i, d.uri)
                                                                      for i, d in enumerate(config.datasets)]
    counts = Counter(s for step in sources["whole"].values() for s in set(step))
    assert [r["steps"] for r in records] == [counts[0], counts[1]] and counts[0] > 0 and counts[1] > 0
    assert all(math.isfinite(r["loss"]) and 1 <= r["step"] <= 8 for r in records)
    report = storage.get_json(cfg.data_report_uri(config.output.uri, "1"))["stages"]["main"]
    assert report["multiTask"]["strategy"] == "interleave" and report["multiTask"]["temperature"] == 2.0
    n0, n1 = (s["rowsKept"] - s["validationRows"] for s in report["sources"])
    assert report["multiTask"]["shares"] == pytest.approx([n0 ** 0.5 / (n0 ** 0.5 + n1 ** 0.5),
                                                           n1 ** 0.5 / (n0 ** 0.5 + n1 ** 0.5)], abs=1e-5)

    config = interleave_config(storage, model_bucket, bucket, s3_endpoint, "resumed/")
    monkeypatch.setattr(run_module, "run_loop", recording("first", preempt_at=5))
    first = execute(config, tmp_path / "first")
    assert first.exit_code == exit_codes.PREEMPTED, first.result.message
    monkeypatch.setattr(run_module, "run_loop", recording("second"))
    resumed = execute(config, tmp_path / "second")
    assert resumed.exit_code == 0 and resumed.resumed_from_step == 5, resumed.result.message
    assert sorted(sources["second"]) == [6, 7, 8]
    assert {**sources["first"], **sources["second"]} == sources["whole"]
    assert resumed.losses["main"] == pytest.approx(whole.losses["main"], rel=1e-3, abs=1e-3)
    again = storage.get_json(cfg.progress_uri(config.output.uri, "1"))["datasetLosses"]
    assert [r["steps"] for r in again] == [r["steps"] for r in records]  # counted from the checkpoint on


def test_multi_task_defaults_to_mixing_and_bounds_the_temperature():
    assert cfg.Preprocessing().multiTask.strategy == "mix" and cfg.Preprocessing().multiTask.temperature is None
    with pytest.raises(ValueError, match="temperature"):
        cfg.MultiTask(strategy="interleave", temperature=0.0)
    with pytest.raises(ValueError, match="strategy"):
        cfg.MultiTask(strategy="round-robin")
