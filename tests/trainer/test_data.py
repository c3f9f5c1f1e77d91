"""Data preprocessing on known inputs: formats, mixing, packing, masking (PII redaction and de-duplication: test_curation.py)."""

from __future__ import annotations

import gzip
import json
from collections import Counter

import pytest
from conftest import upload_dataset

from finetune_trainer.config import Preprocessing, Validation
from finetune_trainer.data import mixing, packing
from finetune_trainer.data.formats import Example, parse_line
from finetune_trainer.data.pipeline import prepare
from finetune_trainer.data.tokenize import Sequence, encode, encode_chat, truncate, PreferencePair
from finetune_trainer.errors import ConfigError, DataError
from finetune_trainer.testing import tiny


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.train_tokenizer()


MIXTURE_CASES = [
    ([50, 50], [0.8, 0.2], [80, 20]),
    ([10, 90], [1, 1], [50, 50]),
    ([3, 4], [1, 2], [2, 5]),
    ([7], [5], [7]),
    ([1, 1, 1], [1, 1, 1], [1, 1, 1]),
]


@pytest.mark.parametrize("sizes,weights,counts", MIXTURE_CASES)
def test_mixture_counts(sizes, weights, counts):
    assert mixing.mixture_counts(sizes, weights) == counts


def test_mix_takes_rows_by_weight_and_upsamples_the_small_dataset():
    big, small = [("big", i) for i in range(50)], [("small", i) for i in range(10)]
    mixed = mixing.mix([big, small], [0.5, 0.5], seed=1)
    assert Counter(name for name, _ in mixed) == {"big": 30, "small": 30}
    assert Counter(mixed)[("small", 0)] == 3  # every small row exactly three times
    assert mixed == mixing.mix([big, small], [0.5, 0.5], seed=1)


PACKING_CASES = [  # best-fit decreasing: lengths of the documents in each row
    ([3, 4, 2, 5], 8, [[5, 3], [4, 2]]),
    ([8, 1, 7], 8, [[8], [7, 1]]),
    ([2, 2, 2, 2, 2], 6, [[2, 2, 2], [2, 2]]),
    ([6, 5, 3, 2, 2], 8, [[6, 2], [5, 3], [2]]),
    ([5], 4, [[4]]),
]


@pytest.mark.parametrize("lengths,max_length,expected", PACKING_CASES)
def test_packing(lengths, max_length, expected):
    sequences = [Sequence(list(range(100 * i, 100 * i + n)), [i % 2] * n) for i, n in enumerate(lengths)]
    packed = packing.pack(sequences, max_length)
    assert [[len(ids) for ids, _ in row.documents()] for row in packed] == expected
    assert all(len(row) <= max_length for row in packed)
    for row in packed:  # each document keeps its own tokens and loss mask, whole
        for ids, mask in row.documents():
            original = next(s for s in sequences if s.input_ids[0] == ids[0])
            assert ids == original.input_ids[:max_length] and mask == original.loss_mask[:max_length]


PARSE_ERROR_CASES = [
    ("text", b"{not json", "not valid JSON"),
    ("text", b'["a list"]', "must be a JSON object"),
    ("text", b'{"txt": "typo"}', "missing field 'text'"),
    ("instruction", b'{"instruction": "x", "output": 3}', "field 'output' must be a string"),
    ("chat", b'{"messages": [{"role": "robot", "content": "hi"}]}', "messages[0].role must be one of"),
    ("chat", b'{"messages": [{"role": "user", "content": "hi"}]}', "at least one assistant message"),
    ("preference", b'{"prompt": "p", "chosen": "a"}', "missing field 'rejected'"),
]


@pytest.mark.parametrize("fmt,line,message", PARSE_ERROR_CASES)
def test_bad_rows_name_the_file_and_line(fmt, line, message):
    with pytest.raises(DataError) as error:
        parse_line(line, fmt, "s3://b/data.jsonl", 7)
    assert str(error.value).startswith("s3://b/data.jsonl:7: ")
    assert message in str(error.value)


def test_chat_loss_mask_covers_exactly_the_assistant_turns(tokenizer):
    messages = (("system", "Be brief."), ("user", "What does the operator do?"),
                ("assistant", "It watches jobs."), ("user", "And then?"), ("assistant", "It creates the sandbox."))
    sequence = encode_chat(tokenizer, messages)
    trained = [t for t, m in zip(sequence.input_ids, sequence.loss_mask) if m]
    assert tokenizer.decode(trained) == "It watches jobs.<|im_end|>\nIt creates the sandbox.<|im_end|>\n"
    untrained = tokenizer.decode([t for t, m in zip(sequence.input_ids, sequence.loss_mask) if not m])
    assert "Be brief." in untrained and "And then?" in untrained and "watches" not in untrained


ENCODE_CASES = [
    (Example(kind="text", text="the operator restarts a pod."), "the operator restarts a pod.<|endoftext|>",
     "the operator restarts a pod.<|endoftext|>"),
    (Example(kind="completion", prompt="Q: where? A:", completion=" in the bucket."),
     "Q: where? A: in the bucket.<|endoftext|>", " in the bucket.<|endoftext|>"),
]


@pytest.mark.parametrize("example,full,trained", ENCODE_CASES)
def test_encode_masks_the_prompt(tokenizer, example, full, trained):
    sequence = encode(tokenizer, example)
    assert tokenizer.decode(sequence.input_ids) == full
    assert tokenizer.decode([t for t, m in zip(sequence.input_ids, sequence.loss_mask) if m]) == trained


def test_truncation_keeps_the_end_of_a_preference_prompt():
    pair = PreferencePair(list(range(10)), [100, 101, 102], [200, 201])
    cut, was_cut = truncate(pair, 8)
    assert was_cut and cut.prompt_ids == [5, 6, 7, 8, 9] and cut.chosen_ids == [100, 101, 102]
    assert truncate(Sequence([1, 2, 3], [0, 1, 1]), 2) == (Sequence([1, 2], [0, 1]), True)


def test_pipeline_report_counts_reads_drops_and_tokens(storage, bucket, tokenizer):
    rows = [{"text": "the operator restarts a pod."}, {"text": "The operator restarts a pod!"},
            {"text": "the operator restarts a pod."}, {"text": "x"},
            {"text": "mail ops@example.com about the node."}] + tiny.sample_rows("text", 30, seed=3)
    uri = f"{bucket}data/text.jsonl.gz"
    storage.put_bytes(uri, gzip.compress(tiny.jsonl(rows)))
    data = prepare(storage, tokenizer, [_dataset(uri, "text")], Validation(splitRatio=0.2),
                   Preprocessing(maxSeqLength=32, minTokens=3, deduplicate=True, redactPII=True), "causal-lm", seed=0)
    source = data.report["sources"][0]
    assert source["rowsRead"] == 35
    assert source["dropped"] == {"duplicate-exact": 1, "duplicate-normalised": 1, "too-short": 1}
    assert source["piiRedacted"]["email"] == 1
    assert source["rowsKept"] == 32 == len(data.train) + len(data.validation)
    assert 1 <= len(data.validation) <= 15
    assert data.report["trainTokens"] == sum(len(s) for s in data.train)
    assert any("[EMAIL]" in tokenizer.decode(s.input_ids) for s in data.train + data.validation)


def test_pipeline_reads_every_file_under_a_prefix_and_packs(storage, bucket, tokenizer):
    for part in range(2):
        tiny.upload_rows(storage, f"{bucket}corpus/part-{part}.jsonl", tiny.sample_rows("text", 20, seed=part))
    data = prepare(storage, tokenizer, [_dataset(f"{bucket}corpus/", "text")], Validation(splitRatio=0.0),
                   Preprocessing(maxSeqLength=64, packing=True), "causal-lm", seed=0)
    assert data.report["sources"][0]["files"] == [f"{bucket}corpus/part-0.jsonl", f"{bucket}corpus/part-1.jsonl"]
    assert len(data.train) < 40 and all(len(s) <= 64 for s in data.train)
    assert data.report["trainTokens"] == data.report["sources"][0]["tokens"]


def test_pipeline_bad_row_error_names_file_and_line(storage, bucket, tokenizer):
    uri = f"{bucket}data/broken.jsonl"
    storage.put_bytes(uri, b'{"text": "fine"}\n\n{"text": 5}\n')
    with pytest.raises(DataError, match=r"broken.jsonl:3: bad text row"):
        prepare(storage, tokenizer, [_dataset(uri, "text")], Validation(), Preprocessing(), "sft", seed=0)


def test_pipeline_rejects_formats_that_do_not_fit_the_objective(storage, bucket, tokenizer):
    ds = upload_dataset(storage, bucket, "chat", "chat", 4)
    with pytest.raises(ConfigError, match="objective dpo needs datasets of format preference"):
        prepare(storage, tokenizer, [_dataset(ds["uri"], "chat")], Validation(), Preprocessing(), "dpo", seed=0)


def test_pipeline_mixes_datasets_by_weight(storage, bucket, tokenizer):
    a = upload_dataset(storage, bucket, "a", "instruction", 40, seed=1)
    b = upload_dataset(storage, bucket, "b", "chat", 40, seed=2)
    data = prepare(storage, tokenizer, [_dataset(a["uri"], "instruction", 3.0), _dataset(b["uri"], "chat", 1.0)],
                   Validation(splitRatio=0.0), Preprocessing(maxSeqLength=128, deduplicate=False), "sft", seed=0)
    assert data.report["mixture"] == {a["uri"]: 60, b["uri"]: 20}
    texts = [tokenizer.decode(s.input_ids) for s in data.train]
    assert sum("<|im_start|>system" in t for t in texts) == 20  # the chat rows (instruction rows have no system turn)
    assert all("<|im_start|>user" in t for t in texts)  # instruction rows are rendered with the chat template too


def _dataset(uri, fmt, weight=1.0):
    from finetune_trainer.config import Dataset

    return Dataset(uri=uri, format=fmt, weight=weight)


def test_sample_rows_are_valid_rows_of_their_format():
    for fmt in ("text", "instruction", "chat", "preference"):
        for number, row in enumerate(tiny.sample_rows(fmt, 5), start=1):
            parse_line(json.dumps(row), fmt, "sample", number)


def test_training_rows_are_packed_and_held_out_rows_are_scored_alone(storage, bucket, tokenizer):
    """Packing is for training only: every held-out item is one document (a Sequence, never a packed
    row), so each validation row is scored by itself."""
    tiny.upload_rows(storage, f"{bucket}packed/rows.jsonl", tiny.sample_rows("text", 60, seed=4))
    data = prepare(storage, tokenizer, [_dataset(f"{bucket}packed/rows.jsonl", "text")], Validation(splitRatio=0.2),
                   Preprocessing(maxSeqLength=64, packing=True), "causal-lm", seed=0)
    assert data.report["packed"] and data.validation
    assert all(isinstance(row, packing.PackedRow) for row in data.train)
    assert any(len(row.documents()) > 1 for row in data.train)
    assert all(type(item) is Sequence for item in data.validation)
    assert data.report["validationSequences"] == len(data.validation) == data.report["sources"][0]["validationRows"]


def test_each_epoch_packs_a_fresh_subset_of_a_down_sampled_dataset(storage, bucket, tokenizer):
    """PreparedData.epoch: the down-sampled dataset's rows differ from epoch to epoch and together
    cover more of it than one epoch does; each epoch is packed again into rows that fit; an epoch is
    the same on every rank and every restart (a pure function of the seed and the epoch)."""
    big = upload_dataset(storage, bucket, "big", "text", 60, seed=5)
    small = upload_dataset(storage, bucket, "small", "text", 20, seed=6)
    data = prepare(storage, tokenizer, [_dataset(big["uri"], "text", 0.25), _dataset(small["uri"], "text", 0.75)],
                   Validation(splitRatio=0.0), Preprocessing(maxSeqLength=64, packing=True, deduplicate=False),
                   "causal-lm", seed=3)
    big_rows = {tuple(s.input_ids) for s in data.sources[0]}

    def big_docs(items) -> frozenset:
        return frozenset(tuple(ids) for row in items for ids, _ in row.documents() if tuple(ids) in big_rows)

    epochs = [data.epoch(e) for e in range(4)]
    assert epochs[0] is data.train
    for items in epochs:
        assert all(isinstance(row, packing.PackedRow) and len(row) <= 64 for row in items)
        assert len(big_docs(items)) == data.report["mixture"][big["uri"]]
    assert len({big_docs(items) for items in epochs}) == 4
    assert len(frozenset().union(*map(big_docs, epochs))) > len(big_docs(epochs[0])) * 2
    again = data.epoch(2)
    assert [row.documents() for row in again] == [row.documents() for row in epochs[2]]
