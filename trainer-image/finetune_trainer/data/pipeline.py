"""From S3 JSON Lines to token sequences: read (streamed), content filters, redact, de-duplicate, tokenize,
length-filter, split off validation, drop validation rows that leak from training, mix by share (or, interleaved,
keep the datasets apart: interleave.py), pack (training only). Every drop is counted in the data report."""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

from ..errors import ConfigError, DataError
from ..storage import NotFound, Storage
from . import dedup, filters, mixing, overlap, packing, pii
from .formats import Example, parse_line
from .tokenize import FeedbackItem, PreferencePair, Sequence, encode, truncate

DATA_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".gz")
DEFAULT_SPLIT_RATIO = 0.05
# Objectives whose datasets must all be of one format, and that format's only objective.
OBJECTIVE_FORMATS = {"dpo": "preference", "kto": "feedback"}


@dataclass
class SourceReport:
    uri: str
    format: str
    weight: float
    files: list[str] = field(default_factory=list)
    rowsRead: int = 0
    rowsKept: int = 0
    validationRows: int = 0
    truncated: int = 0
    tokens: int = 0
    trainTokens: int = 0
    targetTokens: int = 0
    dropped: Counter = field(default_factory=Counter)
    piiRedacted: Counter = field(default_factory=Counter)
    contentFilters: dict = field(default_factory=dict)  # per filter: rows dropped / flagged, examples (filters.py)

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "dropped": dict(self.dropped), "piiRedacted": dict(self.piiRedacted)}


@dataclass
class PreparedData:
    train: list[Sequence | PreferencePair | FeedbackItem]           # the first epoch's training items
    validation: list[Sequence | PreferencePair | FeedbackItem]
    report: dict[str, Any]
    sources: list[list] = field(default_factory=list)  # every kept training row, per dataset
    weights: list[float] = field(default_factory=list)  # each dataset's relative share (weights, or mixing.shares)
    seed: int = 0
    pack_length: int | None = None
    # multiTask.strategy interleave: train is every dataset's items (packed per dataset), concatenated in order,
    # source_sizes items each; the loop takes each micro-batch from one of them (interleave.py).
    interleave: bool = False
    source_sizes: list[int] = field(default_factory=list)

    def epoch(self, epoch: int) -> list:
        """The training items of an epoch. A dataset down-sampled by its weight gives a fresh subset
        each epoch (a dataset mixed at or above its size repeats whole), so over the epochs every row
        is used; then packing. The number of items stays close to the first epoch's."""
        if self.interleave or epoch == 0 or not mixing.down_samples([len(s) for s in self.sources], self.weights):
            return self.train
        rows = mixing.mix(self.sources, self.weights, self.seed, epoch)
        return packing.pack(rows, self.pack_length) if self.pack_length else rows

    def rows(self) -> list:
        """Every distinct training row (the DPO and KTO reference log-probs are computed for each)."""
        return [row for source in self.sources for row in source]


def data_files(storage: Storage, uri: str) -> list[str]:
    """The object itself, or the JSON Lines objects under a prefix."""
    if not uri.endswith("/") and storage.exists(uri):
        return [uri]
    prefix = uri if uri.endswith("/") else uri + "/"
    files = [u for u in storage.list_keys(prefix) if u.endswith(DATA_SUFFIXES)]
    if not files:
        raise DataError(f"{uri}: no such object and no .jsonl files under it")
    return files


def read_examples(storage: Storage, uri: str, fmt: str, report: SourceReport) -> Iterator[Example]:
    for file_uri in data_files(storage, uri):
        report.files.append(file_uri)
        try:
            for line_number, line in enumerate(storage.iter_lines(file_uri), start=1):
                if not line.strip():
                    continue
                report.rowsRead += 1
                yield parse_line(line, fmt, file_uri, line_number)
        except NotFound:
            raise DataError(f"{file_uri}: object not found") from None


def is_validation_row(example: Example, ratio: float) -> bool:
    """A stable split: the same row lands on the same side on every rank and every restart."""
    digest = hashlib.blake2b(dedup.exact_key(example), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 1_000_000 < ratio * 1_000_000


def preprocess(examples, tokenizer, preprocessing, report: SourceReport, deduplicator: dedup.Deduplicator | None,
               content_filters: filters.ContentFilters | None = None):
    """Yields (example, tokenized) for the rows that survive content filters, redaction, de-duplication and
    length filters. Content filters see the rows as written (a pattern may look for what redaction replaces)."""
    if content_filters is not None:
        examples = content_filters.apply(examples, report)
    for example in examples:
        if preprocessing.redactPII:
            example = example.map_strings(lambda s: pii.redact(s, report.piiRedacted))
        if deduplicator is not None:
            reason = deduplicator.duplicate_reason(example)
            if reason:
                report.dropped[reason] += 1
                continue
        item = encode(tokenizer, example)
        if len(item) < preprocessing.minTokens:
            report.dropped["too-short"] += 1
            continue
        item, was_cut = truncate(item, preprocessing.maxSeqLength)
        report.truncated += int(was_cut)
        if isinstance(item, Sequence) and not any(item.loss_mask):
            report.dropped["no-trainable-tokens"] += 1
            continue
        yield example, item


def target_tokens(item) -> int:
    """The tokens the model is trained to predict (a preference pair: its two answers)."""
    if isinstance(item, PreferencePair):
        return len(item.chosen_ids) + len(item.rejected_ids)
    if isinstance(item, FeedbackItem):
        return len(item.completion_ids)
    return sum(item.loss_mask)


def drop_leaks(held_out, leaks: overlap.OverlapChecker, sources: list[SourceReport], validation_uri: str | None):
    """The held-out items that do not leak from training, and the overlap report."""
    training = leaks.training_grams()
    kept, overlapping, dropped, largest = [], 0, 0, 0.0
    for example, item, source in held_out:
        shared = leaks.shared_fraction(example, training)
        largest = max(largest, shared)
        overlapping += shared > 0
        if shared >= overlap.LEAK_FRACTION:
            dropped += 1
            if source is not None:
                sources[source].validationRows -= 1
                sources[source].rowsKept -= 1
                sources[source].dropped["validation-overlap"] += 1
            continue
        kept.append(item)
    if held_out and not kept:
        raise DataError(f"{validation_uri or 'the validation split'}: all {len(held_out)} validation rows share at least "
                        f"{overlap.LEAK_FRACTION:.0%} of their word 8-grams with training rows; such a held-out set "
                        f"measures memorisation, not generalisation")
    report = {"rowsChecked": len(held_out), "rowsOverlapping": overlapping, "rowsDropped": dropped,
              "largestSharedFraction": round(largest, 4), "dropFraction": overlap.LEAK_FRACTION,
              "gramWords": overlap.GRAM, "sampling": leaks.modulus}
    return kept, report


def check_formats(datasets, objective: str) -> None:
    formats = {d.format for d in datasets}
    needed = OBJECTIVE_FORMATS.get(objective)
    if needed is not None and formats != {needed}:
        raise ConfigError(f"objective {objective} needs datasets of format {needed}, got {sorted(formats)}")
    for paired_objective, fmt in OBJECTIVE_FORMATS.items():
        if objective != paired_objective and fmt in formats:
            raise ConfigError(f"format {fmt} needs objective {paired_objective}, got objective {objective}")


def pair_for_kl(rows: list[FeedbackItem], seed: int, max_length: int) -> None:
    """KTO's KL reference point: every training row also gets another row's completion (cut to what
    its prompt leaves of max_length), chosen once per stage by a seeded cycle through all rows, so a
    row's mismatched pair, and so its reference log-prob, is the same on every rank and restart."""
    if len(rows) < 2:
        raise DataError(f"objective kto needs at least 2 training rows, got {len(rows)}: the KL reference point "
                        f"pairs each prompt with another row's completion")
    order = list(range(len(rows)))
    random.Random(f"kto-kl/{seed}").shuffle(order)
    for position, index in enumerate(order):
        row, other = rows[index], rows[order[(position + 1) % len(order)]]
        row.kl_completion_ids = other.completion_ids[:max(max_length - len(row.prompt_ids), 1)]


def feedback_counts(rows: list[FeedbackItem]) -> dict[str, int]:
    desirable = sum(row.desirable for row in rows)
    return {"desirable": desirable, "undesirable": len(rows) - desirable}


def prepare(storage: Storage, tokenizer, datasets, validation, preprocessing, objective: str, seed: int) -> PreparedData:
    if not preprocessing.contentFilters:
        return _prepare(storage, tokenizer, datasets, validation, preprocessing, objective, seed, None)
    with filters.ContentFilters(preprocessing.contentFilters, storage) as content_filters:
        return _prepare(storage, tokenizer, datasets, validation, preprocessing, objective, seed, content_filters)


def _prepare(storage: Storage, tokenizer, datasets, validation, preprocessing, objective: str, seed: int,
             content_filters: filters.ContentFilters | None) -> PreparedData:
    check_formats(datasets, objective)
    deduplicator = dedup.Deduplicator() if preprocessing.deduplicate else None
    split_ratio = 0.0 if validation.uri else (validation.splitRatio if validation.splitRatio is not None else DEFAULT_SPLIT_RATIO)
    leaks = overlap.OverlapChecker()
    sources, per_source_train, held_out = [], [], []  # held_out: (example, item, source index)
    for index, dataset in enumerate(datasets):
        report = SourceReport(dataset.uri, dataset.format, dataset.weight)
        kept = []
        for example, item in preprocess(read_examples(storage, dataset.uri, dataset.format, report), tokenizer,
                                        preprocessing, report, deduplicator, content_filters):
            report.tokens += len(item)
            if split_ratio and is_validation_row(example, split_ratio):
                held_out.append((example, item, index))
                report.validationRows += 1
            else:
                kept.append(item)
                leaks.add_training(example)
                report.trainTokens += len(item)
                report.targetTokens += target_tokens(item)
        report.rowsKept = len(kept) + report.validationRows
        if not kept:
            raise DataError(f"{dataset.uri}: no rows left for training after preprocessing "
                            f"(read {report.rowsRead}, dropped {dict(report.dropped)})")
        sources.append(report)
        per_source_train.append(kept)

    validation_report = None
    if validation.uri:
        validation_report = SourceReport(validation.uri, datasets[0].format, 0.0)
        eval_preprocessing = preprocessing.model_copy(update={"deduplicate": False})
        held_out = [(example, item, None) for example, item in preprocess(
            read_examples(storage, validation.uri, datasets[0].format, validation_report), tokenizer,
            eval_preprocessing, validation_report, None, content_filters)]
    validation_items, overlap_report = drop_leaks(held_out, leaks, sources, validation.uri)
    if validation_report:
        validation_report.rowsKept = validation_report.validationRows = len(validation_items)
    if split_ratio and not held_out:
        # Too few rows for the ratio to pick any: hold out one row of the largest dataset.
        largest = max(range(len(per_source_train)), key=lambda i: len(per_source_train[i]))
        if len(per_source_train[largest]) > 1:
            validation_items.append(per_source_train[largest].pop())
            sources[largest].validationRows += 1

    if objective == "kto":
        pair_for_kl([row for rows in per_source_train for row in rows], seed, preprocessing.maxSeqLength)
    multi_task = preprocessing.multiTask
    interleaved = multi_task.strategy == "interleave"
    shares = mixing.shares([len(t) for t in per_source_train], [d.weight for d in datasets], multi_task.temperature)
    # Relative shares: the weights themselves when not temperature-scaled (the same rounding as ever).
    relative = [d.weight for d in datasets] if multi_task.temperature is None else shares
    packed = preprocessing.packing and objective not in OBJECTIVE_FORMATS
    if interleaved:  # a micro-batch holds one dataset's rows, so each dataset is packed on its own
        per_source_items = [packing.pack(t, preprocessing.maxSeqLength) if packed else list(t)
                            for t in per_source_train]
        train = [item for items in per_source_items for item in items]
        mixed_counts = mixing.split(len(train), relative)  # items served per epoch, as micro-batches come in turns
    else:
        train = mixing.mix(per_source_train, relative, seed)
        mixed_counts = mixing.mixture_counts([len(t) for t in per_source_train], relative)
        if packed:  # validation is never packed: each held-out row is scored alone
            train = packing.pack(train, preprocessing.maxSeqLength)

    report = {
        "sources": [s.to_dict() for s in sources],
        "validation": {**(validation_report.to_dict() if validation_report else {"splitRatio": split_ratio}),
                       "overlap": overlap_report},
        "mixture": {s.uri: count for s, count in zip(sources, mixed_counts)},
        "multiTask": {"strategy": multi_task.strategy, "temperature": multi_task.temperature,
                      "shares": [round(share, 6) for share in shares]},
        "rowsRead": sum(s.rowsRead for s in sources),
        "rowsDropped": sum(sum(s.dropped.values()) for s in sources),
        "contentFilters": filters.summary([s.contentFilters for s in sources]),
        "trainSequences": len(train),
        "validationSequences": len(validation_items),
        "trainTokens": sum(len(x) for x in train),
        "targetTokens": sum(s.targetTokens for s in sources),
        "validationTokens": sum(len(x) for x in validation_items),
        "packed": packed,
        "maxSeqLength": preprocessing.maxSeqLength,
    }
    if objective == "kto":  # the class balance desirableWeight and undesirableWeight are set against
        report["feedback"] = {"train": feedback_counts([row for rows in per_source_train for row in rows]),
                              "validation": feedback_counts(validation_items)}
    return PreparedData(train, validation_items, report, per_source_train, relative, seed,
                        preprocessing.maxSeqLength if packed else None, interleaved,
                        [len(items) for items in per_source_items] if interleaved else [])
