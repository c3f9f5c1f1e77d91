"""From S3 JSON Lines to token sequences: read (streamed), redact, de-duplicate, tokenize,
length-filter, split off validation, drop validation rows that leak from training, mix by weight,
pack (training only). Every drop is counted in the data report."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

from ..errors import ConfigError, DataError
from ..storage import NotFound, Storage
from . import dedup, mixing, overlap, packing, pii
from .formats import Example, parse_line
from .tokenize import PreferencePair, Sequence, encode, truncate

DATA_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".gz")
DEFAULT_SPLIT_RATIO = 0.05


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

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "dropped": dict(self.dropped), "piiRedacted": dict(self.piiRedacted)}


@dataclass
class PreparedData:
    train: list[Sequence | PreferencePair]           # the first epoch's training items
    validation: list[Sequence | PreferencePair]
    report: dict[str, Any]
    sources: list[list] = field(default_factory=list)  # every kept training row, per dataset
    weights: list[float] = field(default_factory=list)
    seed: int = 0
    pack_length: int | None = None

    def epoch(self, epoch: int) -> list:
        """The training items of an epoch. A dataset down-sampled by its weight gives a fresh subset
        each epoch (a dataset mixed at or above its size repeats whole), so over the epochs every row
        is used; then packing. The number of items stays close to the first epoch's."""
        if epoch == 0 or not mixing.down_samples([len(s) for s in self.sources], self.weights):
            return self.train
        rows = mixing.mix(self.sources, self.weights, self.seed, epoch)
        return packing.pack(rows, self.pack_length) if self.pack_length else rows

    def rows(self) -> list:
        """Every distinct training row (the DPO reference log-probs are computed for each)."""
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


def preprocess(examples, tokenizer, preprocessing, report: SourceReport, deduplicator: dedup.Deduplicator | None):
    """Yields (example, tokenized) for the rows that survive redaction, de-duplication and length filters."""
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
    if objective == "dpo" and formats != {"preference"}:
        raise ConfigError(f"objective dpo needs datasets of format preference, got {sorted(formats)}")
    if objective != "dpo" and "preference" in formats:
        raise ConfigError(f"format preference needs objective dpo, got objective {objective}")


def prepare(storage: Storage, tokenizer, datasets, validation, preprocessing, objective: str, seed: int) -> PreparedData:
    check_formats(datasets, objective)
    deduplicator = dedup.Deduplicator() if preprocessing.deduplicate else None
    split_ratio = 0.0 if validation.uri else (validation.splitRatio if validation.splitRatio is not None else DEFAULT_SPLIT_RATIO)
    leaks = overlap.OverlapChecker()
    sources, per_source_train, held_out = [], [], []  # held_out: (example, item, source index)
    for index, dataset in enumerate(datasets):
        report = SourceReport(dataset.uri, dataset.format, dataset.weight)
        kept = []
        for example, item in preprocess(read_examples(storage, dataset.uri, dataset.format, report), tokenizer,
                                        preprocessing, report, deduplicator):
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
            eval_preprocessing, validation_report, None)]
    validation_items, overlap_report = drop_leaks(held_out, leaks, sources, validation.uri)
    if validation_report:
        validation_report.rowsKept = validation_report.validationRows = len(validation_items)
    if split_ratio and not held_out:
        # Too few rows for the ratio to pick any: hold out one row of the largest dataset.
        largest = max(range(len(per_source_train)), key=lambda i: len(per_source_train[i]))
        if len(per_source_train[largest]) > 1:
            validation_items.append(per_source_train[largest].pop())
            sources[largest].validationRows += 1

    train = mixing.mix(per_source_train, [d.weight for d in datasets], seed)
    mixed_counts = mixing.mixture_counts([len(t) for t in per_source_train], [d.weight for d in datasets])
    packed = preprocessing.packing and objective != "dpo"
    if packed:  # validation is never packed: each held-out row is scored alone
        train = packing.pack(train, preprocessing.maxSeqLength)

    report = {
        "sources": [s.to_dict() for s in sources],
        "validation": {**(validation_report.to_dict() if validation_report else {"splitRatio": split_ratio}),
                       "overlap": overlap_report},
        "mixture": {s.uri: count for s, count in zip(sources, mixed_counts)},
        "rowsRead": sum(s.rowsRead for s in sources),
        "rowsDropped": sum(sum(s.dropped.values()) for s in sources),
        "trainSequences": len(train),
        "validationSequences": len(validation_items),
        "trainTokens": sum(len(x) for x in train),
        "targetTokens": sum(s.targetTokens for s in sources),
        "validationTokens": sum(len(x) for x in validation_items),
        "packed": packed,
        "maxSeqLength": preprocessing.maxSeqLength,
    }
    return PreparedData(train, validation_items, report, per_source_train, [d.weight for d in datasets], seed,
                        preprocessing.maxSeqLength if packed else None)
