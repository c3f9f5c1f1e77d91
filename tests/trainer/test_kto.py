"""The feedback format and the KTO objective: rows, tokenization, KL pairs, the loss against hand-computed
values, its gradient on the tiny model, and whole runs (with a resume) through the trainer."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_config, upload_dataset

from finetune_trainer import config as cfg
from finetune_trainer import run as run_module
from finetune_trainer.config import Dataset, Hyperparameters, Preprocessing, Validation
from finetune_trainer.data.formats import parse_line
from finetune_trainer.data.pipeline import check_formats, pair_for_kl, prepare
from finetune_trainer.data.tokenize import FeedbackItem, encode, truncate
from finetune_trainer.distributed import DistContext
from finetune_trainer.errors import ConfigError, DataError
from finetune_trainer.objectives import kto
from finetune_trainer.objectives.common import IGNORE
from finetune_trainer.objectives import dpo
from finetune_trainer.run import execute
from finetune_trainer.testing import tiny
from finetune_trainer.train import attach_reference_log_probs, micro_batch

CPU = DistContext(0, 1, 0, torch.device("cpu"))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ---- rows ---------------------------------------------------------------------------------------

ROW_CASES = [
    ({"prompt": "Is it up?", "completion": "Yes.", "label": True}, ("Is it up?", "Yes.", True)),
    ({"prompt": "Is it up?", "completion": "No idea.", "label": False}, ("Is it up?", "No idea.", False)),
    ({"prompt": "", "completion": "Hello.", "label": True}, ("", "Hello.", True)),
]


@pytest.mark.parametrize("row,expected", ROW_CASES)
def test_feedback_rows_parse(row, expected):
    example = parse_line(json.dumps(row), "feedback", "s3://b/f.jsonl", 1)
    assert (example.kind, (example.prompt, example.completion, example.label)) == ("feedback", expected)


BAD_ROW_CASES = [
    ({"prompt": "p", "completion": "c"}, "missing field 'label'"),
    ({"prompt": "p", "completion": "c", "label": "yes"}, "field 'label' must be true (desirable) or false (undesirable), got 'yes'"),
    ({"prompt": "p", "completion": "c", "label": 1}, "field 'label' must be true (desirable) or false (undesirable), got 1"),
    ({"prompt": "p", "completion": "  ", "label": True}, "field 'completion' is empty"),
    ({"completion": "c", "label": True}, "missing field 'prompt'"),
    ({"prompt": "p", "completion": ["c"], "label": False}, "field 'completion' must be a string, got list"),
]


@pytest.mark.parametrize("row,message", BAD_ROW_CASES)
def test_bad_feedback_rows_are_data_errors_naming_file_line_and_field(row, message):
    with pytest.raises(DataError) as error:
        parse_line(json.dumps(row), "feedback", "s3://b/f.jsonl", 7)
    assert str(error.value) == f"s3://b/f.jsonl:7: bad feedback row: {message}"


def test_the_same_text_with_the_other_label_is_another_row():
    up, down = ({"prompt": "p", "completion": "c", "label": label} for label in (True, False))
    assert parse_line(json.dumps(up), "feedback", "f", 1) != parse_line(json.dumps(down), "feedback", "f", 2)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.train_tokenizer()


@pytest.mark.parametrize("label", [True, False])
def test_feedback_is_split_into_prompt_and_completion_like_a_preference_pair(tokenizer, label):
    row = {"prompt": "Where are checkpoints stored?", "completion": "In the bucket.", "label": label}
    item = encode(tokenizer, parse_line(json.dumps(row), "feedback", "f", 1))
    pair = encode(tokenizer, parse_line(json.dumps({"prompt": row["prompt"], "chosen": row["completion"],
                                                    "rejected": "No."}), "preference", "p", 1))
    assert isinstance(item, FeedbackItem) and item.desirable is label
    assert (item.prompt_ids, item.completion_ids) == (pair.prompt_ids, pair.chosen_ids)
    assert tokenizer.decode(item.completion_ids) == "In the bucket.<|im_end|>\n"


TRUNCATION_CASES = [
    # (prompt, completion, max_length) -> (prompt kept, completion kept)
    (10, 4, 16, (10, 4)),     # fits
    (14, 4, 16, (12, 4)),     # the prompt loses its start
    (4, 30, 16, (4, 12)),     # a short prompt stays whole, the completion is cut
    (20, 30, 16, (8, 8)),     # the prompt keeps half the length, the completion the rest
]


@pytest.mark.parametrize("prompt,completion,max_length,expected", TRUNCATION_CASES)
def test_truncation_keeps_the_end_of_the_prompt(prompt, completion, max_length, expected):
    item = FeedbackItem(list(range(prompt)), list(range(100, 100 + completion)), True)
    cut, was_cut = truncate(item, max_length)
    assert (len(cut.prompt_ids), len(cut.completion_ids)) == expected and len(cut) <= max_length
    assert was_cut == (prompt + completion > max_length)
    assert cut.prompt_ids == item.prompt_ids[len(item.prompt_ids) - expected[0]:]
    assert cut.completion_ids == item.completion_ids[:expected[1]] and cut.desirable


# ---- KL pairs and formats --------------------------------------------------------------------------


def rows_of(n: int, prompt_length: int = 2) -> list[FeedbackItem]:
    return [FeedbackItem([1] * prompt_length, [100 + i] * (i + 1), i % 2 == 0) for i in range(n)]


@pytest.mark.parametrize("n", [2, 3, 10])
def test_every_row_gets_another_rows_completion_once(n):
    rows = rows_of(n)
    pair_for_kl(rows, seed=5, max_length=64)
    sources = [r.kl_completion_ids[0] - 100 for r in rows]
    assert sorted(sources) == list(range(n))  # a permutation: every completion serves once
    assert all(source != i for i, source in enumerate(sources))  # never the row's own
    assert all(r.kl_completion_ids == rows[s].completion_ids for r, s in zip(rows, sources))
    again = rows_of(n)
    pair_for_kl(again, seed=5, max_length=64)
    assert [r.kl_completion_ids for r in again] == [r.kl_completion_ids for r in rows]


def test_a_mismatched_completion_is_cut_to_what_the_prompt_leaves():
    rows = [FeedbackItem([1] * 10, [2] * 3, True), FeedbackItem([1] * 2, [3] * 12, False)]
    pair_for_kl(rows, seed=0, max_length=16)
    assert rows[0].kl_completion_ids == [3] * 6 and rows[1].kl_completion_ids == [2] * 3


def test_kto_needs_two_rows():
    with pytest.raises(DataError, match="objective kto needs at least 2 training rows, got 1"):
        pair_for_kl(rows_of(1), seed=0, max_length=64)


FORMAT_CASES = [
    ("kto", ["feedback"], None),
    ("kto", ["feedback", "feedback"], None),
    ("kto", ["chat"], "objective kto needs datasets of format feedback, got ['chat']"),
    ("kto", ["feedback", "text"], "objective kto needs datasets of format feedback, got ['feedback', 'text']"),
    ("sft", ["feedback"], "format feedback needs objective kto, got objective sft"),
    ("dpo", ["feedback"], "objective dpo needs datasets of format preference, got ['feedback']"),
    ("kto", ["preference"], "objective kto needs datasets of format feedback, got ['preference']"),
]


@pytest.mark.parametrize("objective,formats,message", FORMAT_CASES)
def test_objective_kto_and_format_feedback_go_together(objective, formats, message):
    datasets = [Dataset(uri=f"s3://bkt/{i}.jsonl", format=f) for i, f in enumerate(formats)]
    if message is None:
        check_formats(datasets, objective)
    else:
        with pytest.raises(ConfigError) as error:
            check_formats(datasets, objective)
        assert str(error.value) == message


def test_pipeline_pairs_rows_counts_labels_and_never_packs(storage, bucket, tokenizer):
    ds = upload_dataset(storage, bucket, "feedback", "feedback", 30)
    data = prepare(storage, tokenizer, [Dataset(uri=ds["uri"], format="feedback")], Validation(splitRatio=0.2),
                   Preprocessing(maxSeqLength=64, packing=True), "kto", seed=0)
    assert not data.report["packed"] and all(isinstance(i, FeedbackItem) for i in data.train + data.validation)
    assert all(i.kl_completion_ids for i in data.train)
    feedback = data.report["feedback"]
    assert feedback["train"]["desirable"] == sum(i.desirable for i in data.train)
    assert sum(feedback["train"].values()) == len(data.train) and sum(feedback["validation"].values()) == len(data.validation)
    assert data.report["targetTokens"] == sum(len(i.completion_ids) for i in data.train)


# ---- the loss on fixed log-probs -------------------------------------------------------------------

VOCAB = 7
LOG_P = -math.log(VOCAB)  # every token's log-prob under all-zero logits


class Uniform(torch.nn.Module):
    """All-zero logits: a sequence's log-prob is LOG_P times its number of targets."""

    def forward(self, input_ids, attention_mask):
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, VOCAB)})()


def item_with(desirable: bool, log_ratio: float, kl_log_ratio: float) -> FeedbackItem:
    """A row whose policy (Uniform) log-ratios to its reference are the given ones: completion of 2
    tokens, mismatched completion of 3."""
    return FeedbackItem([1, 2], [3, 4], desirable, kl_completion_ids=[5, 6, 1],
                        reference=(2 * LOG_P - log_ratio, 3 * LOG_P - kl_log_ratio))


# (name, rows as (desirable, r, kl log-ratio), hyperparameters, summed loss, z)
LOSS_CASES = [
    ("policy is the reference", [(True, 0.0, 0.0), (False, 0.0, 0.0)], {}, 2 * 0.5, 0.0),
    ("desirable above the reference point", [(True, 2.0, 1.0)], {}, 1 - sigmoid(0.1), 1.0),
    ("undesirable above the reference point", [(False, 2.0, 1.0)], {}, 1 - sigmoid(-0.1), 1.0),
    ("negative KL is clamped to 0", [(True, 2.0, -3.0)], {}, 1 - sigmoid(0.2), 0.0),
    ("negative KL clamped, undesirable", [(False, -1.0, -3.0)], {"ktoBeta": 0.5}, 1 - sigmoid(0.5), 0.0),
    ("beta scales the margin", [(True, 2.0, 1.0)], {"ktoBeta": 1.0}, 1 - sigmoid(1.0), 1.0),
    ("weights", [(True, 2.0, 1.0), (False, 2.0, 1.0)], {"desirableWeight": 2.0, "undesirableWeight": 0.5},
     2.0 * (1 - sigmoid(0.1)) + 0.5 * (1 - sigmoid(-0.1)), 1.0),
    # z is the mean over the batch's mismatched pairs: (4 + 0 + -1) / 3 = 1
    ("z is the batch mean", [(True, 3.0, 4.0), (False, 0.0, 0.0), (True, 1.0, -1.0)], {"ktoBeta": 1.0},
     (1 - sigmoid(2.0)) + (1 - sigmoid(1.0)) + (1 - sigmoid(0.0)), 1.0),
    ("a batch mean below 0 is clamped", [(True, 1.0, -4.0), (False, 1.0, 1.0)], {"ktoBeta": 1.0},
     (1 - sigmoid(1.0)) + (1 - sigmoid(-1.0)), 0.0),
]


@pytest.mark.parametrize("name,rows,settings,expected,z", LOSS_CASES, ids=[c[0] for c in LOSS_CASES])
def test_loss_against_hand_computed_values(name, rows, settings, expected, z):
    items = [item_with(*row) for row in rows]
    batch = kto.collate(items, pad_id=0)
    hyperparameters = Hyperparameters(**settings)
    loss, metrics = kto.loss(Uniform(), batch, hyperparameters)
    assert kto.rows(batch) == len(rows)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    beta = hyperparameters.ktoBeta
    assert metrics == pytest.approx({
        "kl": z * len(rows),
        "rewards/desirable": sum(beta * r for d, r, _ in rows if d),
        "rewards/undesirable": sum(beta * r for d, r, _ in rows if not d),
        "count/desirable": sum(d for d, _, _ in rows)}, abs=1e-5)


def test_a_filler_row_counts_for_nothing_not_even_in_the_reference_point():
    """A rank whose micro-batch is past the end of the epoch runs one row without targets."""
    items = [item_with(True, 2.0, 1.0), item_with(False, 0.0, 5.0)]
    filler = micro_batch(kto.SPEC, items, [2], pad_id=0)  # index 2 is past the end
    assert kto.rows(filler) == 0
    loss, metrics = kto.loss(Uniform(), filler, Hyperparameters())
    assert loss.item() == 0.0 and metrics["kl"] == 0.0
    one = micro_batch(kto.SPEC, items, [0, 2], pad_id=0)
    loss, metrics = kto.loss(Uniform(), one, Hyperparameters())
    assert loss.item() == pytest.approx(1 - sigmoid(0.1), abs=1e-6) and metrics["kl"] == pytest.approx(1.0)


def test_the_reference_point_carries_no_gradient():
    ratios = torch.tensor([1.0, 2.0], requires_grad=True)
    z = kto.reference_point(ratios, torch.ones(2))
    assert isinstance(z, float) and z == 1.5


def test_collate_puts_rows_then_their_mismatched_pairs_and_evaluates_desirable_completions_only():
    items = [FeedbackItem([1, 2], [3, 4], True, [5]), FeedbackItem([6], [7], False, [3, 4])]
    batch = kto.collate(items, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [6, 7, 0, 0], [1, 2, 5, 0], [6, 3, 4, 0]]
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, 3, 4], [IGNORE, 7, IGNORE, IGNORE],
                                        [IGNORE, IGNORE, 5, IGNORE], [IGNORE, 3, 4, IGNORE]]
    assert batch["desirable"].tolist() == [True, False] and "reference_log_probs" not in batch
    evaluated = kto.eval_collate(items, pad_id=0)
    assert evaluated["labels"].tolist() == [[IGNORE, IGNORE, 3, 4], [IGNORE] * 4]


# ---- the gradient on the tiny model -------------------------------------------------------------


FEEDBACK_ROWS = [("What does the operator do?", "The operator watches jobs."),
                 ("Which port serves metrics?", "a node evicts the logs."),
                 ("How do I restart a job?", "Change the run id."),
                 ("Where are checkpoints stored?", "the bucket scales a secret.")]


@pytest.mark.parametrize("label,direction", [(True, 1), (False, -1)], ids=["desirable up", "undesirable down"])
def test_training_moves_the_completions_log_probs_the_labels_way(label, direction, tiny_model_dirs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"])
    tok = AutoTokenizer.from_pretrained(tiny_model_dirs["llama"])
    rows = [{"prompt": p, "completion": c, "label": label} for p, c in FEEDBACK_ROWS]
    items = [encode(tok, parse_line(json.dumps(r), "feedback", "f", i)) for i, r in enumerate(rows)]
    pair_for_kl(items, seed=0, max_length=64)
    attach_reference_log_probs(model, items, kto.collate, kto.pair_log_probs, tok.pad_token_id, 4, CPU)
    before, _ = kto.pair_log_probs(model, kto.collate(items, tok.pad_token_id))
    assert before.tolist() == pytest.approx([i.reference[0] for i in items], abs=1e-4)

    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    for _ in range(3):
        loss, _ = kto.loss(model, kto.collate(items, tok.pad_token_id), Hyperparameters(ktoBeta=0.5))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after, _ = kto.pair_log_probs(model, kto.collate(items, tok.pad_token_id))
    moved = (after - before).tolist()
    assert all(m * direction > 0 for m in moved), moved


def joint_forward_loss(model, batch: dict, hyperparameters) -> torch.Tensor:
    """The loss as it was first written: the rows and their mismatched pairs in one forward with gradients on,
    z detached afterwards (the mismatched rows' graph kept and run through backward for nothing)."""
    policy, policy_mismatched = dpo.pair_log_probs(model, batch)
    reference = batch["reference_log_probs"].to(policy.dtype)
    half = reference.shape[0] // 2
    valid = kto.real_rows(batch).float()
    z = kto.reference_point(policy_mismatched - reference[half:], valid)
    return (kto.kto_losses(policy - reference[:half], batch["desirable"], z, hyperparameters) * valid).sum()


def saved_for_backward(model, compute) -> tuple[torch.Tensor, int]:
    """compute()'s result and the bytes of the distinct tensors, other than the model's parameters, that its
    graph keeps for backward (the activations)."""
    parameters = {p.data_ptr() for p in model.parameters()}
    saved: dict[tuple, int] = {}

    def pack(t):
        if t.data_ptr() not in parameters:
            saved[(t.data_ptr(), t.dtype, tuple(t.shape), t.stride())] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = compute()
    return result, sum(saved.values())


def test_the_mismatched_pairs_run_without_gradient_and_the_loss_and_gradients_are_unchanged(tiny_model_dirs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"])
    tok = AutoTokenizer.from_pretrained(tiny_model_dirs["llama"])
    rows = [{"prompt": p, "completion": c, "label": i % 2 == 0} for i, (p, c) in enumerate(FEEDBACK_ROWS)]
    items = [encode(tok, parse_line(json.dumps(r), "feedback", "f", i)) for i, r in enumerate(rows)]
    pair_for_kl(items, seed=0, max_length=64)
    attach_reference_log_probs(model, items, kto.collate, kto.pair_log_probs, tok.pad_token_id, 4, CPU)
    torch.manual_seed(0)
    with torch.no_grad():  # the policy moved away from its reference: r and the mismatched log-ratios are not 0
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.eval()  # no dropout, as in a KTO stage
    batch = kto.collate(items, tok.pad_token_id)
    batch["reference_log_probs"][4:] -= 1.0  # a reference point above 0, where it is not clamped
    hyperparameters = Hyperparameters(ktoBeta=0.5, desirableWeight=1.5)
    kl_log_ratios = kto.kl_log_probs(model, batch) - batch["reference_log_probs"][4:]
    assert kto.reference_point(kl_log_ratios, torch.ones(4)) > 0

    def loss_and_gradients(loss_fn):
        model.zero_grad()
        loss, saved = saved_for_backward(model, lambda: loss_fn(model, batch, hyperparameters))
        loss = loss[0] if isinstance(loss, tuple) else loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, saved

    new_loss, new_gradients, new_saved = loss_and_gradients(kto.loss)
    old_loss, old_gradients, old_saved = loss_and_gradients(joint_forward_loss)
    assert new_loss == pytest.approx(old_loss, rel=1e-5)
    for name, gradient in old_gradients.items():
        torch.testing.assert_close(new_gradients[name], gradient, rtol=1e-4, atol=1e-7, msg=name)
    assert any(float(g.abs().max()) > 0 for g in new_gradients.values())
    # The mismatched rows keep no graph: their log-probs need no gradient, the rows' own do ...
    assert not kto.kl_log_probs(model, batch).requires_grad
    assert kto.pair_log_probs(model, batch)[0].requires_grad
    # ... and the activations the graph keeps for backward are those of the rows only: at most half of those kept
    # for the rows and their pairs in one forward (as many pairs as rows, all padded there to the longest of both).
    assert new_saved <= 0.5 * old_saved, (new_saved, old_saved)


# ---- whole runs -----------------------------------------------------------------------------------


def kto_config(storage, model_bucket, bucket, s3_endpoint, output: str, **overrides):
    ds = upload_dataset(storage, bucket, "feedback", "feedback", 24)
    return make_config(bucket, model_bucket + "llama/", s3_endpoint, [ds], objective="kto",
                       output={"uri": bucket + output}, **overrides)


def test_a_kto_run_trains_and_writes_its_outputs(storage, model_bucket, bucket, s3_endpoint, tmp_path):
    config = kto_config(storage, model_bucket, bucket, s3_endpoint, "kto/", validation={"splitRatio": 0.25},
                        hyperparameters={"maxSteps": 10, "learningRate": 2e-2, "ktoBeta": 0.5})
    summary = execute(config, tmp_path)
    assert summary.exit_code == 0, summary.result.message
    losses = summary.losses["main"]
    assert len(losses) == 10
    # Before the first update the policy is the reference: r = z = 0, every row's loss is 1 - sigmoid(0).
    assert losses[0] == pytest.approx(0.5, abs=1e-4)
    assert sum(losses[-3:]) / 3 < losses[0], losses
    out = config.output.uri
    assert storage.list_keys(cfg.adapter_uri(out))
    report = storage.get_json(cfg.data_report_uri(out, "1"))["stages"]["main"]
    assert report["packed"] is False
    assert sum(report["feedback"]["train"].values()) == report["trainSequences"]
    assert storage.get_json(cfg.result_uri(out, "1"))["succeeded"] is True
    # Perplexity is measured on the held-out desirable completions.
    assert report["feedback"]["validation"]["desirable"] > 0
    assert summary.evaluation.perplexity < summary.evaluation.basePerplexity


def test_a_resumed_kto_run_keeps_its_reference_log_probs(storage, model_bucket, bucket, s3_endpoint, tmp_path,
                                                         monkeypatch):
    """The resumed run takes the reference from the checkpoint (the model by then is no longer the
    reference) and continues exactly as the uninterrupted run did."""
    config = kto_config(storage, model_bucket, bucket, s3_endpoint, "kto-resume/", checkpoint={"everySteps": 3},
                        hyperparameters={"maxSteps": 6, "learningRate": 2e-2, "ktoBeta": 0.5})
    first = execute(config, tmp_path / "first")
    assert first.exit_code == 0, first.result.message
    prefix = cfg.checkpoint_prefix(None, config.output.uri, "1")
    state = storage.get_json(f"{prefix}step-00000003/trainer-state.json")
    assert len(state["reference"]) == sum(storage.get_json(cfg.data_report_uri(config.output.uri, "1"))
                                          ["stages"]["main"]["feedback"]["train"].values())
    storage.client.delete_object(Bucket=config.output.uri[5:].split("/")[0],
                                 Key=cfg.result_uri(config.output.uri, "1").split("/", 3)[3])

    def recomputed(*args, **kwargs):
        raise AssertionError("the reference log-probs were computed again on resume")

    monkeypatch.setattr(run_module, "attach_reference_log_probs", recomputed)
    resumed = execute(config, tmp_path / "resumed")
    assert resumed.exit_code == 0, resumed.result.message
    assert resumed.resumed_from_step == 3
    assert resumed.losses["main"][3:] == pytest.approx(first.losses["main"][3:], rel=1e-4, abs=1e-5)
