"""Content filters (preprocessing.contentFilters): rows whose prompt or answer matches a term list, a
regular expression or a text classifier are dropped or flagged, before PII redaction, de-duplication
and tokenization. Nothing goes silently: each dataset's report counts the rows per filter, with up to
three examples, PII redacted and cut to 200 characters.

What a filter examines (`fields`), by the row's fields, so every format is covered:

* prompt: the instruction and its input, the system, user and tool turns of a chat, the prompt of a
  preference (or feedback) row;
* answer: the output or completion, the assistant turns, the chosen answer of a preference row, the
  completion of a desirable (label true) feedback row;
* a text row has no such sides: its text is examined whole, whatever `fields` says;
* the rejected answer of a preference row and the completion of an undesirable (label false) feedback row
  are never examined: they are what the model is trained away from (a filter dropping thumbs-down rows
  for what they say would delete the very examples KTO learns from, and tilt its balance of labels).
  Their prompts are examined like any other.

The strings of a side are joined by newlines and matched as one text. Filters run in list order on
batches of rows; a row dropped by one filter is not seen by the next, a flagged row is.

Matchers, one registry (MATCHERS), each built from a ContentFilter:

* terms: compared word by word (runs of letters and digits), ignoring case, so `bad word` matches
  "Bad  word!" but not "badword"; a term list file in S3 adds to the inline terms.
* regex: Python `re`. Patterns that nest unbounded repetitions are refused by the config; on top, a
  text is searched in windows of REGEX_WINDOW characters overlapping by REGEX_OVERLAP, so one search
  costs at most what a window costs (a match longer than the overlap that straddles two windows
  can be missed).
* classifier: a Hugging Face sequence classifier from S3, scored in batches on this process's GPU
  (or the CPU); a text matches when the probability of `label` is at least `threshold`. Every
  process scores every row (the data is prepared on each), then the model is freed before training.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ..config import Preprocessing
from ..errors import ConfigError, DataError
from ..storage import NotFound
from . import pii
from .formats import Example

PROMPT_ROLES = ("system", "user", "tool")
MAX_EXAMPLES = 3          # per filter and dataset in the data report
EXAMPLE_CHARS = 200       # an example's length in the data report, after redaction
EXAMPLE_LEAD = 60         # characters kept before a term or pattern match in an example
REGEX_WINDOW = 10_000
REGEX_OVERLAP = 500
MAX_TERMS_FILE_BYTES = 16 << 20
ROWS_PER_BATCH = 256      # rows filtered together (a classifier scores their texts in batches)
CLASSIFIER_BATCH = 32
CLASSIFIER_MAX_TOKENS = 512
DEFAULT_THRESHOLD = 0.5
WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class Match:
    """Where a text matched (span: into the text, None for a classifier) and what matched it."""

    detail: dict[str, Any]
    span: tuple[int, int] | None = None


def texts_of(example: Example, fields: str) -> list[tuple[str, str]]:
    """(side, text) pairs a filter on `fields` examines; empty texts are left out."""
    if example.kind == "text":
        return [("text", example.text)] if example.text.strip() else []
    prompt = [example.prompt, example.context, *(c for role, c in example.messages if role in PROMPT_ROLES)]
    # An undesirable feedback completion is, like a rejected answer, what the model is trained away from.
    completion = "" if example.kind == "feedback" and example.label is False else example.completion
    answer = [completion, example.chosen, *(c for role, c in example.messages if role == "assistant")]
    sides = {"prompt": prompt, "answer": answer}
    chosen = ("prompt", "answer") if fields == "both" else (fields,)
    out = []
    for side in chosen:
        text = "\n".join(s for s in sides[side] if s)
        if text.strip():
            out.append((side, text))
    return out


# ---- matchers -------------------------------------------------------------------------------------


def _words(text: str) -> list[re.Match]:
    return list(WORD.finditer(text))


class TermMatcher:
    def __init__(self, terms: Iterable[str]):
        self.terms: dict[tuple[str, ...], str] = {}
        for term in terms:
            key = tuple(w.group().casefold() for w in _words(term))
            if key:
                self.terms.setdefault(key, term)
        self.lengths = sorted({len(k) for k in self.terms})

    def find(self, texts: list[str]) -> list[Match | None]:
        return [self._find(text) for text in texts]

    def _find(self, text: str) -> Match | None:
        words = _words(text)
        folded = [w.group().casefold() for w in words]
        for start in range(len(words)):
            for n in self.lengths:
                term = self.terms.get(tuple(folded[start:start + n])) if start + n <= len(words) else None
                if term is not None:
                    return Match({"term": term[:EXAMPLE_CHARS]}, (words[start].start(), words[start + n - 1].end()))
        return None


def read_terms(storage, uri: str) -> list[str]:
    """A term list file: one term per line; blank lines and # comments skipped."""
    try:
        data = storage.get_bytes(uri)
    except NotFound:
        raise DataError(f"{uri}: term list not found") from None
    if len(data) > MAX_TERMS_FILE_BYTES:
        raise DataError(f"{uri}: term list of {len(data)} bytes is above the limit of {MAX_TERMS_FILE_BYTES}")
    try:
        lines = data.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{uri}: term list is not UTF-8 ({e})") from None
    terms = []
    for number, line in enumerate(lines, start=1):
        term = line.strip()
        if not term or term.startswith("#"):
            continue
        if not WORD.search(term):
            raise DataError(f"{uri}:{number}: term {term[:80]!r} has no letter or digit (terms are matched word by word)")
        terms.append(term)
    return terms


def _build_terms(spec, storage, work_dir) -> TermMatcher:
    return TermMatcher([*(spec.terms or []), *(read_terms(storage, spec.termsUri) if spec.termsUri else [])])


class RegexMatcher:
    def __init__(self, patterns: Iterable[str]):
        self.patterns = [re.compile(p) for p in patterns]

    def find(self, texts: list[str]) -> list[Match | None]:
        return [self._find(text) for text in texts]

    def _find(self, text: str) -> Match | None:
        for pattern in self.patterns:
            for start in range(0, max(len(text) - REGEX_OVERLAP, 1), REGEX_WINDOW - REGEX_OVERLAP):
                end = min(start + REGEX_WINDOW, len(text))
                m = pattern.search(text, start, end)
                # A match touching a window's end inside the text may be an artefact of the cut ($, \b, a
                # shortened greedy match); the next window, which overlaps, sees it whole.
                if m and (m.end() < end or end == len(text)):
                    return Match({"pattern": pattern.pattern}, m.span())
        return None


def _build_regex(spec, storage, work_dir) -> RegexMatcher:
    return RegexMatcher(spec.patterns or [])


class ClassifierMatcher:
    """A sequence classifier: a text matches when P(label) >= threshold."""

    def __init__(self, model_dir: str | Path, label: str, threshold: float, device: str | None = None,
                 batch_size: int = CLASSIFIER_BATCH):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForSequenceClassification.from_pretrained(model_dir)
        if self.tokenizer.pad_token is None:  # decoder-only classifiers (GPT-2 style) have none
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        labels = {str(v): int(k) for k, v in model.config.id2label.items()}
        index = labels.get(label)
        if index is None:
            folded = {k.casefold(): v for k, v in labels.items()}
            index = folded.get(label.casefold())
        if index is None:
            raise ConfigError(f"content filter label {label!r} is not a label of the classifier "
                              f"(its labels: {', '.join(sorted(labels))})")
        if device is None:
            device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        self.model = model.to(device).eval()
        self.device, self.index, self.threshold, self.batch_size = device, index, threshold, batch_size
        self.multi_label = model.config.problem_type == "multi_label_classification"
        limit = self.tokenizer.model_max_length
        self.max_tokens = min(CLASSIFIER_MAX_TOKENS, limit if isinstance(limit, int) and limit > 0 else CLASSIFIER_MAX_TOKENS)

    def scores(self, texts: list[str]) -> list[float]:
        import torch

        out: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                                   max_length=self.max_tokens, return_tensors="pt", return_token_type_ids=False)
            with torch.inference_mode():
                logits = self.model(**{k: v.to(self.device) for k, v in batch.items()}).logits.float()
            probabilities = logits.sigmoid() if self.multi_label else logits.softmax(-1)
            out += probabilities[:, self.index].tolist()
        return out

    def find(self, texts: list[str]) -> list[Match | None]:
        return [Match({"score": round(s, 4)}) if s >= self.threshold else None for s in self.scores(texts)]

    def close(self) -> None:
        import torch

        del self.model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _build_classifier(spec, storage, work_dir) -> ClassifierMatcher:
    local = Path(work_dir) / spec.name
    if not storage.download_prefix(spec.modelUri, local):
        raise DataError(f"{spec.modelUri}: no classifier model files under it")
    threshold = spec.threshold if spec.threshold is not None else DEFAULT_THRESHOLD
    return ClassifierMatcher(local, spec.label, threshold)


MATCHERS: dict[str, Callable[[Any, Any, str], Any]] = {
    "terms": _build_terms,
    "regex": _build_regex,
    "classifier": _build_classifier,
}


# ---- applying them --------------------------------------------------------------------------------


def example_text(text: str, match: Match) -> str:
    """The matched text as the report shows it: PII redacted, at most EXAMPLE_CHARS characters, around the
    match when there is one (the match is found again in the redacted text)."""
    redacted = pii.redact(text)
    start = 0
    if match.span is not None:
        lead = pii.redact(text[:match.span[0]])  # the redacted text before the match
        start = max(0, len(lead) - EXAMPLE_LEAD)
    window = redacted[start:start + EXAMPLE_CHARS]
    if start > 0:
        window = "…" + window[1:]
    if start + EXAMPLE_CHARS < len(redacted):
        window = window[:-1] + "…"
    return window


class Filter:
    def __init__(self, spec, matcher):
        self.spec, self.matcher = spec, matcher

    @property
    def name(self) -> str:
        return self.spec.name

    def report_entry(self) -> dict[str, Any]:
        return {"type": self.spec.type, "fields": self.spec.fields, "action": self.spec.action,
                "rowsDropped": 0, "rowsFlagged": 0, "examples": []}

    def matches(self, examples: list[Example]) -> list[tuple[str, str, Match] | None]:
        """Per example: the first of its texts that matches, as (side, text, match), or None."""
        owners, texts = [], []
        for i, example in enumerate(examples):
            for side, text in texts_of(example, self.spec.fields):
                owners.append((i, side))
                texts.append(text)
        found: list[tuple[str, str, Match] | None] = [None] * len(examples)
        for (i, side), text, match in zip(owners, texts, self.matcher.find(texts) if texts else []):
            if match is not None and found[i] is None:
                found[i] = (side, text, match)
        return found

    def record(self, entry: dict[str, Any], side: str, text: str, match: Match) -> None:
        entry["rowsDropped" if self.spec.action == "drop" else "rowsFlagged"] += 1
        if len(entry["examples"]) < MAX_EXAMPLES:
            entry["examples"].append({"field": side, "text": example_text(text, match), **match.detail})

    def close(self) -> None:
        if hasattr(self.matcher, "close"):
            self.matcher.close()


class ContentFilters:
    """The filters of preprocessing.contentFilters, built once (term files read, classifiers loaded) and
    applied to the rows of each dataset; close() frees the classifiers."""

    def __init__(self, specs, storage, work_dir: str | Path | None = None):
        problems = Preprocessing.model_construct(contentFilters=list(specs)).content_filter_problems()
        if problems:
            raise ConfigError("; ".join(f"preprocessing.{p}" for p in problems))
        self._tmp = tempfile.TemporaryDirectory(prefix="content-filters-",
                                                dir=work_dir or os.environ.get("FINETUNE_TRAINER_WORK_DIR"))
        self.filters: list[Filter] = []
        try:
            for spec in specs:
                self.filters.append(Filter(spec, MATCHERS[spec.type](spec, storage, self._tmp.name)))
        except BaseException:
            self.close()
            raise

    def apply(self, examples: Iterable[Example], report) -> Iterator[Example]:
        """The examples that no drop filter matches, in order; every match is counted in report.contentFilters
        (and each dropped row in report.dropped['content-filter'])."""
        entries = {f.name: report.contentFilters.setdefault(f.name, f.report_entry()) for f in self.filters}
        batch: list[Example] = []
        for example in examples:
            batch.append(example)
            if len(batch) == ROWS_PER_BATCH:
                yield from self._filter(batch, entries, report)
                batch = []
        if batch:
            yield from self._filter(batch, entries, report)

    def _filter(self, batch: list[Example], entries: dict[str, dict], report) -> list[Example]:
        for content_filter in self.filters:
            kept = []
            for example, found in zip(batch, content_filter.matches(batch)):
                if found is not None:
                    content_filter.record(entries[content_filter.name], *found)
                    if content_filter.spec.action == "drop":
                        report.dropped["content-filter"] += 1
                        continue
                kept.append(example)
            batch = kept
        return batch

    def close(self) -> None:
        for content_filter in self.filters:
            content_filter.close()
        self.filters = []
        self._tmp.cleanup()

    def __enter__(self) -> "ContentFilters":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def summary(per_dataset: list[dict[str, dict]]) -> dict[str, dict[str, int]]:
    """Per filter, the rows dropped and flagged over the datasets (their reports' contentFilters)."""
    out: dict[str, dict[str, int]] = {}
    for entries in per_dataset:
        for name, entry in entries.items():
            total = out.setdefault(name, {"rowsDropped": 0, "rowsFlagged": 0})
            total["rowsDropped"] += entry["rowsDropped"]
            total["rowsFlagged"] += entry["rowsFlagged"]
    return out
