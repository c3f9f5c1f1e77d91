"""Content filters (preprocessing.contentFilters): which rows each filter drops or flags, what the data
report says about them, the refusal of bad patterns, term lists and classifiers from S3, and a run."""

from __future__ import annotations

import json
import math
import re

import pytest
from conftest import make_config, upload_dataset
from pydantic import ValidationError

from finetune_trainer import config as cfg
from finetune_trainer import validation
from finetune_trainer.config import ContentFilter, Dataset, Preprocessing, Validation
from finetune_trainer.data import filters
from finetune_trainer.data.formats import Example
from finetune_trainer.data.pipeline import SourceReport, prepare
from finetune_trainer.errors import ConfigError, DataError
from finetune_trainer.run import execute
from finetune_trainer.testing import tiny


def _filter(**spec) -> ContentFilter:
    return ContentFilter.model_validate({"name": "f", **spec})


def _apply(specs: list[ContentFilter], examples: list[Example], storage=None) -> tuple[list[Example], SourceReport]:
    report = SourceReport("s3://b/data.jsonl", "chat", 1.0)
    with filters.ContentFilters(specs, storage) as content_filters:
        kept = list(content_filters.apply(examples, report))
    return kept, report


def _outcome(spec: ContentFilter, example: Example) -> str:
    kept, report = _apply([spec], [example])
    entry = report.contentFilters[spec.name]
    if not kept:
        assert entry["rowsDropped"] == 1 and report.dropped["content-filter"] == 1
        return "dropped"
    assert kept == [example] and entry["rowsDropped"] == 0 and "content-filter" not in report.dropped
    return "flagged" if entry["rowsFlagged"] else "kept"


TERMS = {"type": "terms", "terms": ["bad word", "evil"]}
INSTRUCTION = Example(kind="instruction", prompt="Say a Bad  word!", context="", completion="No.")
CHAT = Example(kind="chat", messages=(("system", "Be evil."), ("user", "hello"), ("assistant", "Hi there.")))
CHAT_ANSWER = Example(kind="chat", messages=(("user", "hello"), ("assistant", "An evil plan.")))
PREFERENCE_REJECTED = Example(kind="preference", prompt="Plan?", chosen="A kind plan.", rejected="An evil plan.")
PREFERENCE_CHOSEN = Example(kind="preference", prompt="Plan?", chosen="An evil plan.", rejected="A kind plan.")

# (what, filter, row, outcome)
OUTCOME_CASES = [
    ("phrase across spacing, case and punctuation", TERMS, INSTRUCTION, "dropped"),
    ("term inside a longer word", TERMS, Example(kind="instruction", prompt="an evildoer", completion="no"), "kept"),
    ("phrase words apart", TERMS, Example(kind="instruction", prompt="bad, very bad. a word", completion="x"), "kept"),
    ("answer only, term in the prompt", {**TERMS, "fields": "answer"}, INSTRUCTION, "kept"),
    ("prompt only, term in the prompt", {**TERMS, "fields": "prompt"}, INSTRUCTION, "dropped"),
    ("instruction input is the prompt side", {**TERMS, "fields": "prompt"},
     Example(kind="instruction", prompt="Translate", context="evil text", completion="x"), "dropped"),
    ("chat system turn is the prompt side", {**TERMS, "fields": "prompt"}, CHAT, "dropped"),
    ("chat system turn is not the answer", {**TERMS, "fields": "answer"}, CHAT, "kept"),
    ("chat assistant turn is the answer", {**TERMS, "fields": "answer"}, CHAT_ANSWER, "dropped"),
    ("chat assistant turn is not the prompt", {**TERMS, "fields": "prompt"}, CHAT_ANSWER, "kept"),
    ("completion is the answer", {**TERMS, "fields": "answer"},
     Example(kind="completion", prompt="Q:", completion=" pure evil"), "dropped"),
    ("rejected answer is never examined", TERMS, PREFERENCE_REJECTED, "kept"),
    ("chosen answer is the answer", {**TERMS, "fields": "answer"}, PREFERENCE_CHOSEN, "dropped"),
    ("preference prompt", {**TERMS, "fields": "prompt"},
     Example(kind="preference", prompt="Why evil?", chosen="a", rejected="b"), "dropped"),
    ("text row examined whole whatever fields", {**TERMS, "fields": "prompt"},
     Example(kind="text", text="the operator is not evil."), "dropped"),
    ("no match", TERMS, Example(kind="text", text="the operator restarts a pod."), "kept"),
    ("flag keeps the row", {**TERMS, "action": "flag"}, INSTRUCTION, "flagged"),
    ("regex", {"type": "regex", "patterns": [r"\b\d{3}-\d{4}\b"]},
     Example(kind="instruction", prompt="q", completion="call 555-0199"), "dropped"),
    ("regex is case-sensitive", {"type": "regex", "patterns": ["SECRET"]},
     Example(kind="text", text="a secret plan"), "kept"),
    ("regex with its own flags", {"type": "regex", "patterns": ["(?i)SECRET"]},
     Example(kind="text", text="a secret plan"), "dropped"),
    ("regex, second pattern", {"type": "regex", "patterns": ["^never$", r"plan\."], "action": "flag"},
     Example(kind="text", text="a secret plan."), "flagged"),
    ("regex on the prompt only", {"type": "regex", "patterns": ["plan"], "fields": "prompt"},
     Example(kind="instruction", prompt="q", completion="a plan"), "kept"),
]


@pytest.mark.parametrize("what,spec,example,outcome", OUTCOME_CASES, ids=[c[0] for c in OUTCOME_CASES])
def test_which_rows_a_filter_drops_or_flags(what, spec, example, outcome):
    assert _outcome(_filter(**spec), example) == outcome


def _feedback(desirable: bool, term_in: str) -> Example:
    prompt, completion = ("Why evil?", "Because.") if term_in == "prompt" else ("Why?", "Pure evil.")
    return Example(kind="feedback", prompt=prompt, completion=completion, label=desirable)


# (label, where the term is, fields) -> outcome. An undesirable (thumbs-down) completion is, like a rejected answer,
# what KTO trains away from: never examined, so a filter does not delete the undesirable rows KTO needs. Its prompt is.
FEEDBACK_CASES = [
    (True, "completion", "prompt", "kept"),
    (True, "completion", "answer", "dropped"),
    (True, "completion", "both", "dropped"),
    (False, "completion", "prompt", "kept"),
    (False, "completion", "answer", "kept"),
    (False, "completion", "both", "kept"),
    (True, "prompt", "prompt", "dropped"),
    (True, "prompt", "answer", "kept"),
    (True, "prompt", "both", "dropped"),
    (False, "prompt", "prompt", "dropped"),
    (False, "prompt", "answer", "kept"),
    (False, "prompt", "both", "dropped"),
]


@pytest.mark.parametrize("desirable,term_in,fields,outcome", FEEDBACK_CASES,
                         ids=[f"{'desirable' if c[0] else 'undesirable'}, term in {c[1]}, fields {c[2]}"
                              for c in FEEDBACK_CASES])
def test_an_undesirable_feedback_completion_is_never_examined_its_prompt_is(desirable, term_in, fields, outcome):
    assert _outcome(_filter(**TERMS, fields=fields), _feedback(desirable, term_in)) == outcome


def test_filters_run_in_order_and_a_dropped_row_is_not_seen_again():
    rows = [Example(kind="text", text=t) for t in ("evil plan", "evil", "plan", "nothing here")]
    flag = _filter(name="flag-plans", type="regex", patterns=["plan"], action="flag")
    drop = _filter(name="drop-evil", type="terms", terms=["evil"])

    kept, report = _apply([drop, flag], rows)
    assert [r.text for r in kept] == ["plan", "nothing here"]
    assert report.contentFilters["drop-evil"]["rowsDropped"] == 2
    assert report.contentFilters["flag-plans"]["rowsFlagged"] == 1  # "evil plan" was gone before it

    kept, report = _apply([flag, drop], rows)
    assert [r.text for r in kept] == ["plan", "nothing here"]
    assert report.contentFilters["flag-plans"]["rowsFlagged"] == 2 and report.dropped["content-filter"] == 2


def test_rows_stream_through_in_order_across_batches():
    rows = [Example(kind="text", text=f"row {i} {'evil' if i % 7 == 0 else 'fine'}") for i in range(filters.ROWS_PER_BATCH * 2 + 5)]
    kept, report = _apply([_filter(type="terms", terms=["evil"])], rows)
    assert kept == [r for i, r in enumerate(rows) if i % 7 != 0]
    assert report.contentFilters["f"]["rowsDropped"] == len(rows) - len(kept)


def test_report_counts_each_filter_with_three_redacted_examples_of_200_characters():
    long_text = "filler " * 100 + "an evil plan by jane.doe@example.com " + "more " * 100
    rows = [Example(kind="text", text=long_text)] + [Example(kind="text", text=f"evil {i}") for i in range(4)] + [
        Example(kind="instruction", prompt="mail ops@example.com", completion="an evil reply")]
    kept, report = _apply([_filter(name="evil", type="terms", terms=["evil"]),
                           _filter(name="unused", type="regex", patterns=["never matches"], action="flag")], rows)
    assert kept == []
    entry = report.contentFilters["evil"]
    assert (entry["type"], entry["fields"], entry["action"]) == ("terms", "both", "drop")
    assert (entry["rowsDropped"], entry["rowsFlagged"]) == (6, 0)
    assert len(entry["examples"]) == 3 and all(len(e["text"]) <= filters.EXAMPLE_CHARS for e in entry["examples"])
    first = entry["examples"][0]
    assert first["field"] == "text" and first["term"] == "evil"
    assert "evil plan by [EMAIL]" in first["text"] and "jane.doe" not in first["text"]  # around the match, redacted
    assert first["text"].startswith("…") and first["text"].endswith("…")
    # a filter that matched nothing is in the report too, with zeros: it ran
    assert report.contentFilters["unused"] == {"type": "regex", "fields": "both", "action": "flag", "rowsDropped": 0,
                                               "rowsFlagged": 0, "examples": []}
    assert report.to_dict()["dropped"] == {"content-filter": 6}


def test_a_match_at_a_window_edge_is_not_an_artefact_of_the_cut():
    """A text longer than a regex window is searched in overlapping windows; `$` matches only at its real end."""
    matcher = filters.RegexMatcher([r"foo$", r"\bcat\b"])
    window = filters.REGEX_WINDOW
    assert matcher.find(["x" * (window - 3) + "foo" + "y" * 100])[0] is None
    assert matcher.find(["x" * (window - 3) + "foo" + "y" * 100 + "foo"])[0].span == (window + 100, window + 103)
    assert matcher.find(["a " * window + "cat"])[0].span == (2 * window, 2 * window + 3)
    assert matcher.find([" " * (window - 3) + "cats" * 10])[0] is None  # not "cat" cut off "cats" at a window's end


REFUSED_PATTERNS = [
    ("[unclosed", "patterns[0]: '[unclosed' is not a valid regular expression"),
    ("(?P<x>a", "is not a valid regular expression"),
    ("(a+)+$", "nests unbounded repetitions"),
    (r"(?:\w+\s?)*@", "nests unbounded repetitions"),
    ("(x{2,})+y", "nests unbounded repetitions"),
]


@pytest.mark.parametrize("pattern,message", REFUSED_PATTERNS)
def test_invalid_or_catastrophic_patterns_are_refused(pattern, message):
    with pytest.raises(ValidationError, match=re.escape(message)):
        _filter(type="regex", patterns=[pattern])


NESTING_CASES = [
    ("(a+)+", True), ("(a*)*b", True), ("((ab)+c)*", True), ("(?=a+)+", True), ("(a|b+)*", True),
    ("(a|b)+", False), ("a+b+", False), (r"\d{3}-\d{4}", False), ("(ab{1,3})+", False), ("(?>a+)+", False),
    ("(a++)+", False), ("(?:x{2,5})+", False),
]


@pytest.mark.parametrize("pattern,nested", NESTING_CASES)
def test_nested_unbounded_repeats_are_recognised(pattern, nested):
    assert ContentFilter.nests_unbounded_repeats(pattern) is nested


CROSS_FIELD_CASES = [
    ([{"name": "a", "type": "terms"}], ["contentFilters[0]: type terms needs terms or termsUri"]),
    ([{"name": "a", "type": "regex", "patterns": ["x"], "label": "toxic"}],
     ["contentFilters[0]: label is only allowed with type classifier, not regex"]),
    ([{"name": "a", "type": "classifier", "modelUri": "s3://bkt/m/"}],
     ["contentFilters[0]: type classifier needs modelUri and label"]),
    ([{"name": "a", "type": "terms", "terms": ["x"]}, {"name": "a", "type": "regex", "patterns": ["y"]}],
     ["contentFilters[1].name: 'a' is already used by an earlier filter"]),
    ([{"name": "a", "type": "classifier", "modelUri": "s3://bkt/m/", "label": "toxic", "threshold": 0.9}], []),
]


@pytest.mark.parametrize("specs,problems", CROSS_FIELD_CASES)
def test_cross_field_rules_of_filters(specs, problems):
    preprocessing = Preprocessing(contentFilters=specs)
    assert preprocessing.content_filter_problems() == problems
    config = make_config("s3://bkt/", "s3://bkt/m/", "", [{"uri": "s3://bkt/d.jsonl"}],
                         preprocessing={"contentFilters": specs})
    assert [p for p in validation.problems(config) if "contentFilters" in p] == [f"preprocessing.{p}" for p in problems]
    if problems:
        with pytest.raises(ConfigError, match=re.escape(problems[0])):
            filters.ContentFilters(preprocessing.contentFilters, None)


FIELD_ERROR_CASES = [
    ({"type": "terms", "terms": ["!!!"]}, "has no letter or digit"),
    ({"type": "terms", "terms": []}, "at least 1 item"),
    ({"type": "classifier", "modelUri": "s3://bkt/m/", "label": "toxic", "threshold": 1.5}, "less than or equal to 1"),
    ({"type": "words", "terms": ["x"]}, "'terms', 'regex' or 'classifier'"),
    ({"type": "terms", "terms": ["x"], "action": "delete"}, "'drop' or 'flag'"),
    ({"type": "terms", "terms": ["x"], "name": "Not A Label"}, "should match pattern"),
]


@pytest.mark.parametrize("spec,message", FIELD_ERROR_CASES)
def test_field_errors(spec, message):
    with pytest.raises(ValidationError, match=message):
        ContentFilter.model_validate({"name": "f", **spec})


# ---- from S3 --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.train_tokenizer()


def test_a_term_list_from_s3_adds_to_the_inline_terms(storage, bucket, tokenizer):
    terms_uri = f"{bucket}filters/terms.txt"
    storage.put_bytes(terms_uri, "# banned words\n\nSecret\n  a node evicts  \n".encode())
    rows = tiny.sample_rows("text", 40, seed=5) + [{"text": "a secret checkpoint"}, {"text": "the model reads logs"}]
    data_uri = tiny.upload_rows(storage, f"{bucket}data/text.jsonl", rows)
    spec = {"name": "banned", "type": "terms", "terms": ["model"], "termsUri": terms_uri}
    data = prepare(storage, tokenizer, [Dataset(uri=data_uri, format="text")], Validation(splitRatio=0.0),
                   Preprocessing(maxSeqLength=64, deduplicate=False, contentFilters=[spec]), "causal-lm", seed=0)
    banned = [r for r in rows if any(w in r["text"].lower() for w in ("secret", "a node evicts", "model"))]
    assert 3 <= len(banned) < len(rows)
    source = data.report["sources"][0]
    assert source["contentFilters"]["banned"]["rowsDropped"] == len(banned) == source["dropped"]["content-filter"]
    assert source["rowsKept"] == len(rows) - len(banned) == len(data.train)
    assert data.report["contentFilters"] == {"banned": {"rowsDropped": len(banned), "rowsFlagged": 0}}
    assert data.report["rowsDropped"] == len(banned)
    decoded = [tokenizer.decode(s.input_ids).lower() for s in data.train]
    assert not any("secret" in t or "model" in t or "a node evicts" in t for t in decoded)


TERM_FILE_ERRORS = [
    (b"fine\n***\n", "terms.txt:2: term '***' has no letter or digit"),
    (b"\xff\xfe bad", "is not UTF-8"),
    (None, "terms.txt: term list not found"),
]


@pytest.mark.parametrize("content,message", TERM_FILE_ERRORS)
def test_a_bad_term_list_is_a_data_error(content, message, storage, bucket):
    uri = f"{bucket}filters/terms.txt"
    if content is not None:
        storage.put_bytes(uri, content)
    with pytest.raises(DataError, match=re.escape(message)):
        filters.ContentFilters([_filter(type="terms", termsUri=uri)], storage)


def test_validation_rows_are_filtered_and_reported_too(storage, bucket, tokenizer):
    train = tiny.upload_rows(storage, f"{bucket}data/train.jsonl", tiny.sample_rows("text", 30, seed=1))
    held_out = [{"text": f"held out row {i} about a secret"} for i in range(3)] + [{"text": "held out row, clean"}]
    validation_uri = tiny.upload_rows(storage, f"{bucket}data/validation.jsonl", held_out)
    data = prepare(storage, tokenizer, [Dataset(uri=train, format="text")], Validation(uri=validation_uri),
                   Preprocessing(maxSeqLength=64, contentFilters=[{"name": "s", "type": "terms", "terms": ["secret"]}]),
                   "causal-lm", seed=0)
    assert len(data.validation) == 1
    assert data.report["validation"]["contentFilters"]["s"]["rowsDropped"] == 3


# ---- the classifier -------------------------------------------------------------------------------


def save_tiny_classifier(directory, multi_label: bool = False):
    """A randomly initialised Llama sequence classifier (labels ok, toxic) with the tiny tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = tiny.train_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, num_labels=2, id2label={0: "ok", 1: "toxic"},
                         label2id={"ok": 0, "toxic": 1},
                         problem_type="multi_label_classification" if multi_label else "single_label_classification")
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    return save_tiny_classifier(tmp_path_factory.mktemp("classifier"))


TEXTS = ["the operator restarts a pod.", "a", "Where are checkpoints stored? In the bucket under the run prefix, "
         "written by rank zero every few steps.", "the trainer writes the adapter."]


# (what, the threshold from the texts' scores in increasing order, how many texts match: the top ones)
THRESHOLD_CASES = [
    ("0 matches every text", lambda scores: 0.0, 4),
    ("1, the largest the API allows, matches none here", lambda scores: 1.0, 0),
    ("a text's score: at least the threshold matches", lambda scores: scores[1], 3),
    ("just above that score: it no longer matches", lambda scores: math.nextafter(scores[1], 1.0), 2),
    ("just below the top score", lambda scores: math.nextafter(scores[3], 0.0), 1),
    ("the top score", lambda scores: scores[3], 1),
]


@pytest.mark.parametrize("what,threshold_of,matching", THRESHOLD_CASES, ids=[c[0] for c in THRESHOLD_CASES])
def test_classifier_threshold_mechanics(classifier_dir, what, threshold_of, matching):
    scores = filters.ClassifierMatcher(classifier_dir, "toxic", 0.5, device="cpu").scores(TEXTS)
    ordered = sorted(scores)
    assert len(set(ordered)) == len(TEXTS) and 0.0 < ordered[0] and ordered[-1] < 1.0  # the cases tell them apart
    threshold = threshold_of(ordered)
    ContentFilter.model_validate({"name": "f", "type": "classifier", "modelUri": "s3://bkt/m/", "label": "toxic",
                                  "threshold": threshold})  # a threshold the API accepts
    found = filters.ClassifierMatcher(classifier_dir, "toxic", threshold, device="cpu").find(TEXTS)
    assert [m is not None for m in found] == [score >= ordered[-matching] if matching else False for score in scores]
    assert all(m.detail["score"] == round(score, 4) and m.span is None for m, score in zip(found, scores) if m)


@pytest.mark.parametrize("multi_label", [False, True])
def test_classifier_scores_are_the_label_probability_whatever_the_batching(tmp_path, multi_label):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    directory = save_tiny_classifier(tmp_path, multi_label)
    batched = filters.ClassifierMatcher(directory, "TOXIC", 0.5, device="cpu", batch_size=4).scores(TEXTS)
    single = filters.ClassifierMatcher(directory, "toxic", 0.5, device="cpu", batch_size=1).scores(TEXTS)
    assert batched == pytest.approx(single, abs=1e-5)  # padding does not change a text's score

    model, tok = AutoModelForSequenceClassification.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)
    with torch.no_grad():
        logits = model(input_ids=tok(TEXTS[0], return_tensors="pt")["input_ids"]).logits[0]
    expected = logits[1].sigmoid() if multi_label else logits.softmax(-1)[1]
    assert batched[0] == pytest.approx(expected.item(), abs=1e-5)


def test_classifier_refuses_a_label_it_does_not_have(classifier_dir):
    with pytest.raises(ConfigError, match=r"label 'hateful' is not a label of the classifier \(its labels: ok, toxic\)"):
        filters.ClassifierMatcher(classifier_dir, "hateful", 0.5, device="cpu")


def test_classifier_from_s3_flags_every_row_at_threshold_zero(storage, bucket, tokenizer, classifier_dir):
    model_uri = f"{bucket}classifiers/toxic/"
    storage.upload_dir(classifier_dir, model_uri)
    data_uri = tiny.upload_rows(storage, f"{bucket}data/chat.jsonl", tiny.sample_rows("chat", 12, seed=2))
    spec = {"name": "toxicity", "type": "classifier", "modelUri": model_uri, "label": "toxic", "threshold": 0.0,
            "action": "flag", "fields": "answer"}
    data = prepare(storage, tokenizer, [Dataset(uri=data_uri, format="chat")], Validation(splitRatio=0.0),
                   Preprocessing(maxSeqLength=128, deduplicate=False, contentFilters=[spec]), "sft", seed=0)
    entry = data.report["sources"][0]["contentFilters"]["toxicity"]
    assert (entry["rowsFlagged"], entry["rowsDropped"], len(data.train)) == (12, 0, 12)
    assert [e["field"] for e in entry["examples"]] == ["answer"] * 3 and all("score" in e for e in entry["examples"])


# ---- a run ----------------------------------------------------------------------------------------


def test_a_run_with_a_filter_drops_the_rows_and_reports_them(storage, model_bucket, bucket, s3_endpoint, tmp_path):
    ds = upload_dataset(storage, bucket, "chat", "chat", 40)
    rows = [json.loads(line) for line in storage.get_bytes(ds["uri"]).decode().splitlines()]
    banned = [r for r in rows if "restart" in r["messages"][1]["content"].lower()]  # one of the four questions
    assert 0 < len(banned) < len(rows)
    config = make_config(bucket, model_bucket + "llama/", s3_endpoint, [ds], hyperparameters={"maxSteps": 3},
                         evaluation={"compareToBase": False},
                         preprocessing={"contentFilters": [{"name": "no-restarts", "type": "regex",
                                                            "patterns": ["(?i)restart"], "fields": "prompt"}]})
    summary = execute(config, tmp_path)
    assert summary.exit_code == 0, summary.result.message

    report = storage.get_json(cfg.data_report_uri(config.output.uri, "1"))["stages"]["main"]
    source = report["sources"][0]
    assert source["contentFilters"]["no-restarts"]["rowsDropped"] == len(banned) == source["dropped"]["content-filter"]
    assert report["contentFilters"] == {"no-restarts": {"rowsDropped": len(banned), "rowsFlagged": 0}}
    assert source["rowsKept"] == len(rows) - sum(source["dropped"].values())
    assert report["rowsDropped"] == sum(source["dropped"].values()) >= len(banned)
    assert all("restart" in e["text"].lower() and e["field"] == "prompt"
               for e in source["contentFilters"]["no-restarts"]["examples"])
    progress = cfg.Progress.model_validate(storage.get_json(cfg.progress_uri(config.output.uri, "1")))
    assert progress.data.stages[0].rowsDropped == report["rowsDropped"]
    stage = progress.data.stages[0]
    assert [(f.name, f.rowsDropped, f.rowsFlagged) for f in stage.contentFilters] == [("no-restarts", len(banned), 0)]
    assert (stage.datasets[0].droppedByContentFilters, stage.datasets[0].flaggedByContentFilters) == (len(banned), 0)
