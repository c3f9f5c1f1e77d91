"""Scoring of generated answers: metrics, user checks, per-task scores and gates."""

from __future__ import annotations

import json
import math

import pytest

from finetune_trainer.data.filters import REGEX_WINDOW
from finetune_trainer.errors import ConfigError
from finetune_trainer.scoring import (METRICS, Check, GeneralGate, PerplexityGate, TaskGate, TaskScores,
                                      evaluate_gates, normalize, per_row, score_task)

# sacrebleu's README example (its first reference set only: one reference per answer here).
README_SYSTEM = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
README_REFERENCES = ["The dog bit the man.", "It was not unexpected.", "The man bit him first."]


# ---- metrics --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("The Cat.", "cat"),
    ("  several \t spaces\n here ", "several spaces here"),
    ("the theory of an anagram", "theory of anagram"),
    ("A", ""),
    ("state-of-the-art", "stateoftheart"),
    ("$5 + 3 = 8", "5 3 8"),
    ("¿Qué ÉPOCA?", "qué época"),
    ("「東京」。", "東京"),
], ids=["case-and-period", "whitespace", "articles-whole-words-only", "only-an-article", "hyphens-join",
        "ascii-symbols", "unicode-punctuation-and-case", "cjk-punctuation"])
def test_normalize(text, expected):
    assert normalize(text) == expected


@pytest.mark.parametrize("metric, predictions, references, expected", [
    ("exactMatch", ["The Eiffel Tower!", "paris", "Berlin"], ["eiffel tower", "Paris.", "Bonn"], 2 / 3),
    ("exactMatch", ["an apple"], ["Apple"], 1.0),
    # normalised: "cat sat on mat" against "cat sat on red mat": 4 shared words, P = 1, R = 4/5
    ("tokenF1", ["the cat sat on a mat"], ["A cat sat on the red mat."], 8 / 9),
    ("tokenF1", ["the cat sat on a mat", "dog"], ["A cat sat on the red mat.", "cat"], (8 / 9 + 0) / 2),
    # "x b b" against "b b b c": 2 shared b's, P = 2/3, R = 2/4
    ("tokenF1", ["x b b"], ["b b b c"], 2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4)),
    ("tokenF1", ["The."], ["a"], 1.0),
    ("tokenF1", ["something"], ["the"], 0.0),
    # rouge_score's README example: stemmed tokens "the quick brown fox jump over the lazi dog" (9) and
    # "the quick brown dog jump on the log" (8); longest common subsequence "the quick brown jump the" (5)
    ("rougeL", ["The quick brown dog jumps on the log."], ["The quick brown fox jumps over the lazy dog"],
     2 * (5 / 8) * (5 / 9) / (5 / 8 + 5 / 9)),
    ("rougeL", ["testing two", "jumping"], ["testing one two", "jumps"], (0.8 + 1.0) / 2),
    ("bleu", ["the cat sat on the mat"], ["the cat sat on the mat"], 1.0),
    # 13a tokens, 6 each: n-gram matches 5/6, 3/5, 1/4, 0/3; sacrebleu's exp smoothing makes 0/3 into 1/(2*3);
    # same lengths, so no brevity penalty
    ("bleu", ["the cat is on the mat"], ["the cat sat on the mat"], (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25),
    # the README's sentences: n-gram matches 12/17, 6/14, 4/11, 3/8 (the README's two reference sets give
    # 14/17, 7/14, 5/11, 3/8, BLEU 48.53); 17 tokens on either side, no brevity penalty
    ("bleu", README_SYSTEM, README_REFERENCES, (12 / 17 * 6 / 14 * 4 / 11 * 3 / 8) ** 0.25),
    ("bleu", ["foo bar"], ["baz qux"], 0.0),
], ids=["exact-match-normalised", "exact-match-article-dropped", "token-f1-one-row", "token-f1-mean-of-rows",
        "token-f1-repeated-words", "token-f1-both-empty-after-normalising", "token-f1-one-empty",
        "rouge-l-readme-example", "rouge-l-subsequence-and-stemming", "bleu-identical", "bleu-smoothed-4-grams",
        "bleu-readme-example-first-references", "bleu-nothing-shared"])
def test_metric_score(metric, predictions, references, expected):
    assert METRICS[metric].score(predictions, references) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("metric, predictions, references, expected", [
    ("exactMatch", ["Yes.", "no"], ["yes", "yes"], [1.0, 0.0]),
    ("tokenF1", ["the cat sat on a mat", "", "x"], ["A cat sat on the red mat.", "", ""], [8 / 9, 1.0, 0.0]),
    ("rougeL", ["testing two", ""], ["testing one two", "anything"], [0.8, 0.0]),
    # sentence BLEU uses the orders it has: "the cat" against "the cat sat" is 2/2, 1/1, with brevity
    # penalty exp(1 - 3/2)
    ("bleu", ["the cat sat on the mat", "the cat"], ["the cat sat on the mat", "the cat sat"],
     [1.0, math.exp(-0.5)]),
], ids=["exactMatch", "tokenF1", "rougeL", "bleu"])
def test_per_row(metric, predictions, references, expected):
    assert per_row(metric, predictions, references) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("metric", sorted(METRICS))
@pytest.mark.parametrize("predictions, references, message", [
    ([], [], "no predictions"),
    (["a", "b"], ["a"], "2 predictions for 1 references"),
], ids=["empty", "lengths-differ"])
def test_metric_refuses_bad_input(metric, predictions, references, message):
    with pytest.raises(ValueError, match=message):
        METRICS[metric].score(predictions, references)
    with pytest.raises(ValueError, match=message):
        per_row(metric, predictions, references)


def test_metric_registry_names_and_descriptions():
    assert list(METRICS) == ["exactMatch", "tokenF1", "rougeL", "bleu"]
    assert all(metric.name == name and metric.description for name, metric in METRICS.items())


def test_per_row_of_unknown_metric_names_the_known_ones():
    with pytest.raises(KeyError, match="exactMatch, tokenF1, rougeL, bleu"):
        per_row("meteor", ["a"], ["a"])


# ---- checks ---------------------------------------------------------------------------------------

LONG_PREFIX = "x " * REGEX_WINDOW  # twice a search window: a match at its end lies past the first window


@pytest.mark.parametrize("check, answer, passes", [
    (Check("cites", contains="[1]", ignoreCase=False), "As shown in [1].", True),
    (Check("cites", contains="[1]"), "As shown in [2].", False),
    (Check("polite", contains="Thank you", ignoreCase=False), "thank you!", False),
    (Check("polite", contains="Thank you", ignoreCase=True), "THANK YOU!", True),
    (Check("polite", contains="Thank you"), "THANK YOU!", True),
    (Check("polite", contains="straße", ignoreCase=True), "STRASSE", True),
    (Check("order-id", pattern=r"ORD-\d{4}", ignoreCase=False), "your order ORD-1234 shipped", True),
    (Check("order-id", pattern=r"ORD-\d{4}", ignoreCase=False), "your order ord-1234 shipped", False),
    (Check("order-id", pattern=r"ORD-\d{4}", ignoreCase=True), "your order ord-1234 shipped", True),
    (Check("span", pattern=r"(?s)start.end", ignoreCase=True), "START\nEND", True),
    (Check("answer-first", pattern=r"^Yes\b"), "Well, Yes it is", False),
    (Check("answer-first", pattern=r"^Yes\b"), "Yes, it is", True),
    (Check("atomic", pattern=r"(?>a+)+b"), "aaab", True),
    (Check("late-match", pattern=r"ORD-\d{4}"), LONG_PREFIX + "ORD-9876", True),
], ids=["contains", "contains-missing", "contains-case-sensitive", "contains-ignore-case",
        "contains-ignores-case-by-default",
        "contains-ignore-case-folds", "pattern", "pattern-case-sensitive", "pattern-ignore-case",
        "pattern-own-flags-and-ignore-case", "pattern-anchor-not-at-start", "pattern-anchor-at-start",
        "atomic-group-accepted", "pattern-past-the-first-window"])
def test_check_passes(check, answer, passes):
    assert check.passes(answer) is passes


def test_check_rate():
    check = Check("cites", pattern=r"\[\d+\]")
    assert check.rate(["see [1]", "none", "[2] and [3]", "[x]"]) == 0.5
    with pytest.raises(ValueError, match="no answers"):
        check.rate([])


@pytest.mark.parametrize("arguments, message", [
    ({"name": "c", "contains": "a", "pattern": "a"}, "exactly one of contains and pattern"),
    ({"name": "c"}, "exactly one of contains and pattern"),
    ({"name": "c", "contains": ""}, "empty contains or pattern"),
    ({"name": "c", "pattern": ""}, "empty contains or pattern"),
    ({"name": "", "contains": "a"}, "needs a name"),
    ({"name": "c", "pattern": "(a+)+$"}, r"nests unbounded repetitions"),
    ({"name": "c", "pattern": r"(\w*\s?)*!"}, r"nests unbounded repetitions"),
    ({"name": "c", "pattern": "(x|y{2,})+z"}, r"nests unbounded repetitions"),
    ({"name": "c", "pattern": "(unclosed"}, "not a valid regular expression"),
], ids=["both", "neither", "empty-contains", "empty-pattern", "no-name", "nested-plus", "nested-star",
        "nested-in-branch", "does-not-compile"])
def test_malformed_check_is_refused(arguments, message):
    with pytest.raises(ConfigError, match=message):
        Check(**arguments)


# ---- task scores ----------------------------------------------------------------------------------

REFERENCES = ["Paris", "The answer is 42 [1]", "blue"]
TUNED = ["paris.", "answer is 42 [1]", "red"]
BASE = ["London", "It is 42", "blue"]


@pytest.mark.parametrize("base_answers, expected", [
    (BASE, {
        "name": "capitals", "rows": 3,
        "metrics": {
            "exactMatch": {"base": 1 / 3, "tuned": 2 / 3, "delta": 1 / 3},
            # base row 2: "it is 42" against "answer is 42 1": 2 shared, P = 2/3, R = 2/4
            "tokenF1": {"base": (0 + 2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4) + 1) / 3, "tuned": 2 / 3,
                        "delta": 2 / 3 - (0 + 4 / 7 + 1) / 3},
        },
        "checks": {"cites": {"base": 0.0, "tuned": 1 / 3, "delta": 1 / 3}},
    }),
    (None, {
        "name": "capitals", "rows": 3,
        "metrics": {"exactMatch": {"base": None, "tuned": 2 / 3, "delta": None},
                    "tokenF1": {"base": None, "tuned": 2 / 3, "delta": None}},
        "checks": {"cites": {"base": None, "tuned": 1 / 3, "delta": None}},
    }),
], ids=["with-base", "without-base"])
def test_score_task(base_answers, expected):
    scores = score_task("capitals", REFERENCES, TUNED, base_answers, ["exactMatch", "tokenF1"],
                        [Check("cites", contains="[1]")])
    result = scores.to_dict()
    assert result["name"] == expected["name"] and result["rows"] == expected["rows"]
    for section in ("metrics", "checks"):
        assert list(result[section]) == list(expected[section])
        for measure, comparison in expected[section].items():
            for key, value in comparison.items():
                assert result[section][measure][key] == (None if value is None else pytest.approx(value)), \
                    (section, measure, key)
    assert TaskScores.from_dict(json.loads(json.dumps(result))) == scores


@pytest.mark.parametrize("metrics, checks, tuned, error, message", [
    (["meteor"], [], TUNED, ConfigError, "unknown metric meteor"),
    (["bleu"], [Check("bleu", contains="x")], TUNED, ConfigError, "check bleu has the name of a metric"),
    ([], [Check("c", contains="x"), Check("c", pattern="y")], TUNED, ConfigError, "check c has the name"),
    (["bleu"], [], TUNED[:2], ValueError, "2 tuned answers for 3 references"),
], ids=["unknown-metric", "check-named-like-metric", "checks-with-one-name", "answers-missing"])
def test_score_task_refuses(metrics, checks, tuned, error, message):
    with pytest.raises(error, match=message):
        score_task("capitals", REFERENCES, tuned, None, metrics, checks)


def test_score_task_refuses_no_rows():
    with pytest.raises(ValueError, match="task empty: no rows"):
        score_task("empty", [], [], None, ["bleu"], [])


# ---- gates ----------------------------------------------------------------------------------------

TASKS = [
    TaskScores("support", 40, metrics={"rougeL": {"base": 0.25, "tuned": 0.312, "delta": 0.062}},
               checks={"polite": {"base": 0.5, "tuned": 0.9, "delta": 0.4}}),
    TaskScores("faq", 10, metrics={"exactMatch": {"base": None, "tuned": 0.7, "delta": None}}),
]
PERPLEXITY = {"base": 12.0, "tuned": 13.2, "ratio": 1.1}
GENERAL = {"base": 18.2, "tuned": 22.4, "rise": 22.4 / 18.2 - 1}


@pytest.mark.parametrize("gate, perplexity, general, expected", [
    (TaskGate("support", "rougeL", minScore=0.4), PERPLEXITY, GENERAL,
     [("task support minScore", "rougeL", 0.312, 0.4, False,
       "task support: rougeL 0.312 is below the minimum 0.400")]),
    (TaskGate("support", "rougeL", minScore=0.3), PERPLEXITY, GENERAL,
     [("task support minScore", "rougeL", 0.312, 0.3, True,
       "task support: rougeL 0.312 is at least the minimum 0.300")]),
    (TaskGate("support", "rougeL", minScore=0.312), PERPLEXITY, GENERAL,
     [("task support minScore", "rougeL", 0.312, 0.312, True,
       "task support: rougeL 0.312 is at least the minimum 0.312")]),
    (TaskGate("support", "rougeL", minScore=0.3125), PERPLEXITY, GENERAL,
     [("task support minScore", "rougeL", 0.312, 0.3125, False,
       "task support: rougeL 0.3120 is below the minimum 0.3125")]),
    (TaskGate("support", "rougeL", minGain=0.1), PERPLEXITY, GENERAL,
     [("task support minGain", "rougeL", 0.062, 0.1, False,
       "task support: rougeL gain +0.062 (0.250 -> 0.312) is below the minimum +0.100")]),
    (TaskGate("support", "rougeL", minGain=-0.1), PERPLEXITY, GENERAL,
     [("task support minGain", "rougeL", 0.062, -0.1, True,
       "task support: rougeL gain +0.062 (0.250 -> 0.312) is at least the minimum -0.100")]),
    (TaskGate("support", "polite", minScore=0.8, minGain=0.5), PERPLEXITY, GENERAL,
     [("task support minScore", "polite", 0.9, 0.8, True, "task support: polite 0.900 is at least the minimum 0.800"),
      ("task support minGain", "polite", 0.4, 0.5, False,
       "task support: polite gain +0.400 (0.500 -> 0.900) is below the minimum +0.500")]),
    (TaskGate("faq", "exactMatch", minGain=0.0), PERPLEXITY, GENERAL,
     [("task faq minGain", "exactMatch", None, 0.0, False,
       "task faq: exactMatch gain needs the base model's score, which was not measured")]),
    (TaskGate("billing", "bleu", minScore=0.2), PERPLEXITY, GENERAL,
     [("task billing minScore", "bleu", None, 0.2, False,
       "task billing was not evaluated (tasks evaluated: support, faq)")]),
    (TaskGate("support", "bleu", minScore=0.2), PERPLEXITY, GENERAL,
     [("task support minScore", "bleu", None, 0.2, False,
       "task support: bleu was not scored (scored: rougeL, polite)")]),
    (GeneralGate(maxPerplexityRise=0.1), PERPLEXITY, GENERAL,
     [("general maxPerplexityRise", "general perplexity", 22.4 / 18.2 - 1, 0.1, False,
       "general perplexity rose 23.1% (18.2 -> 22.4), above the limit 10.0%")]),
    (GeneralGate(maxPerplexityRise=0.05), PERPLEXITY, {"base": 18.2, "tuned": 17.9, "rise": None},
     [("general maxPerplexityRise", "general perplexity", 17.9 / 18.2 - 1, 0.05, True,
       "general perplexity fell 1.6% (18.2 -> 17.9), within the limit 5.0%")]),
    (GeneralGate(maxPerplexityRise=0.1), PERPLEXITY, {"base": 10.0, "tuned": 11.0, "rise": None},
     [("general maxPerplexityRise", "general perplexity", 0.1, 0.1, True,
       "general perplexity rose 10.0% (10.0 -> 11.0), within the limit 10.0%")]),
    (GeneralGate(maxPerplexityRise=0.1), PERPLEXITY, None,
     [("general maxPerplexityRise", "general perplexity", None, 0.1, False,
       "general perplexity was not measured for both the base and the tuned model")]),
    (PerplexityGate(maxRatio=1.2), PERPLEXITY, GENERAL,
     [("perplexity maxRatio", "perplexity ratio", 1.1, 1.2, True,
       "validation perplexity ratio 1.10 (12.0 -> 13.2) is within the limit 1.20")]),
    (PerplexityGate(maxRatio=1.05), PERPLEXITY, GENERAL,
     [("perplexity maxRatio", "perplexity ratio", 1.1, 1.05, False,
       "validation perplexity ratio 1.10 (12.0 -> 13.2) is above the limit 1.05")]),
    (PerplexityGate(maxRatio=1.05), {"base": None, "tuned": 13.2, "ratio": None}, GENERAL,
     [("perplexity maxRatio", "perplexity ratio", None, 1.05, False,
       "validation perplexity was not measured for both the base and the tuned model")]),
], ids=["min-score-below", "min-score-reached", "min-score-equal", "min-score-close-shows-more-digits",
        "min-gain-below", "min-gain-tolerating-a-loss", "check-both-limits", "min-gain-without-base", "task-missing",
        "metric-missing",
        "general-rose-above", "general-fell", "general-at-limit-despite-rounding", "general-not-measured",
        "perplexity-within", "perplexity-above", "perplexity-without-base"])
def test_gate(gate, perplexity, general, expected):
    outcomes = evaluate_gates(perplexity, general, TASKS, [gate])
    assert [(o.name, o.metric, o.value, o.limit, o.passed, o.message) for o in outcomes] == [
        (name, metric, None if value is None else pytest.approx(value), limit, passed, message)
        for name, metric, value, limit, passed, message in expected]


def test_gates_keep_their_order_and_are_json_ready():
    gates = [PerplexityGate(maxRatio=1.2), TaskGate("support", "rougeL", minScore=0.3), GeneralGate(0.1)]
    outcomes = evaluate_gates(PERPLEXITY, GENERAL, TASKS, gates)
    assert [o.name for o in outcomes] == ["perplexity maxRatio", "task support minScore", "general maxPerplexityRise"]
    assert [o.passed for o in outcomes] == [True, True, False]
    assert json.loads(json.dumps([o.to_dict() for o in outcomes]))[2]["message"].startswith("general perplexity rose")


def test_task_gate_needs_a_limit():
    with pytest.raises(ConfigError, match="give minScore, minGain or both"):
        TaskGate("support", "rougeL")
