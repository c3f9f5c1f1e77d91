"""Metrics of generated answers against reference answers, one registry (METRICS) by name.

Every metric gives a corpus score in [0, 1] (score) and, for the samples in a report, a score per row
(per_row):

* exactMatch: the share of rows whose answer equals the reference after normalisation;
* tokenF1: the mean over rows of the F1 of the normalised words the answer and the reference share
  (1.0 when both are empty, 0.0 when only one is);
* rougeL: the mean ROUGE-L F-measure (longest common subsequence of words) of rouge_score, Porter stemmer
  on. Its tokenizer keeps only the ASCII letters and digits, so it sees nothing of a text in another script;
* bleu: sacrebleu's corpus BLEU with its default 13a tokenisation, divided by 100; per row, its sentence
  BLEU (effective order, so a short answer is not zero for lack of 4-grams).

Normalisation (exact match and token F1, as the SQuAD evaluation does it): lower case, punctuation
removed (ASCII and every Unicode punctuation character), the articles a, an and the removed, runs of
whitespace collapsed.
"""

from __future__ import annotations

import functools
import re
import string
import unicodedata
from collections import Counter
from dataclasses import dataclass
from typing import Callable

ARTICLES = re.compile(r"\b(a|an|the)\b")
ASCII_PUNCTUATION = frozenset(string.punctuation)  # holds symbols such as $ + < = > ^ ` | ~ as well


def normalize(text: str) -> str:
    """The text as exact match and token F1 compare it."""
    text = text.lower()
    text = "".join(ch for ch in text
                   if ch not in ASCII_PUNCTUATION and not unicodedata.category(ch).startswith("P"))
    text = ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    predicted, expected = normalize(prediction).split(), normalize(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    shared = sum((Counter(predicted) & Counter(expected)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(predicted), shared / len(expected)
    return 2 * precision * recall / (precision + recall)


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    return _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure


def _bleu(**options):
    from sacrebleu.metrics import BLEU

    return BLEU(**options)


def _unit(score: float) -> float:
    return min(1.0, max(0.0, score / 100))


def corpus_bleu(predictions: list[str], references: list[str]) -> float:
    return _unit(_bleu().corpus_score(predictions, [references]).score)


def sentence_bleu(prediction: str, reference: str) -> float:
    return _unit(_bleu(effective_order=True).sentence_score(prediction, [reference]).score)


def _check_inputs(predictions: list[str], references: list[str]) -> None:
    if not predictions:
        raise ValueError("no predictions to score")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")


@dataclass(frozen=True)
class Metric:
    name: str
    description: str
    row_score: Callable[[str, str], float]
    corpus_score: Callable[[list[str], list[str]], float] | None = None  # None: the mean of the row scores

    def score(self, predictions: list[str], references: list[str]) -> float:
        """The corpus score in [0, 1]; ValueError on no rows or lists of different lengths."""
        _check_inputs(predictions, references)
        if self.corpus_score is not None:
            return self.corpus_score(list(predictions), list(references))
        return sum(self.per_row(predictions, references)) / len(predictions)

    def per_row(self, predictions: list[str], references: list[str]) -> list[float]:
        _check_inputs(predictions, references)
        return [self.row_score(p, r) for p, r in zip(predictions, references)]


METRICS: dict[str, Metric] = {
    metric.name: metric
    for metric in (
        Metric("exactMatch", "Share of answers equal to the reference after normalisation (case, punctuation, "
               "articles and spacing ignored).", exact_match),
        Metric("tokenF1", "Mean F1 of the normalised words shared by answer and reference.", token_f1),
        Metric("rougeL", "Mean ROUGE-L F-measure (longest common word subsequence, stemmed; ASCII letters and "
               "digits only).", rouge_l),
        Metric("bleu", "Corpus BLEU (sacrebleu, 13a tokenisation) / 100.", sentence_bleu, corpus_bleu),
    )
}


def get(name: str) -> Metric:
    """The metric of that name; KeyError naming the known ones otherwise."""
    try:
        return METRICS[name]
    except KeyError:
        raise KeyError(f"unknown metric {name!r} (known: {', '.join(METRICS)})") from None


def per_row(name: str, predictions: list[str], references: list[str]) -> list[float]:
    return get(name).per_row(predictions, references)
