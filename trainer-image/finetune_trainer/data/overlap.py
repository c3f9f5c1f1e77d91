"""Validation rows that leak from training: word 8-grams shared with the training rows.

A held-out row that shares most of its word 8-grams with training rows (a near-duplicate, a
paraphrase with a changed name) measures memorisation, not generalisation. Every row's text is
folded (`words`: Unicode compatibility forms, case, whitespace and punctuation; more loosely than the
normalised de-duplication, which must never merge distinct rows, since here a near-duplicate should
count) and cut into word 8-grams (a row shorter than 8 words is one gram); each gram is a stable 64-bit hash, so every rank
reaches the same verdict. Grams that many training rows hold (a system prompt, an instruction
template, a stock answer) are boilerplate, not leakage: only the grams held by at most
max(BOILERPLATE_ROWS, 0.1 % of the rows) training rows count. The training grams are kept as a sorted array of 8-byte hashes; past
MAX_TRAINING_GRAMS only the grams whose hash is a multiple of a growing modulus are kept (and
compared), a consistent sample that estimates the same shared fraction with bounded memory.
"""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass, field

import numpy as np

from .formats import Example

GRAM = 8
MAX_TRAINING_GRAMS = 20_000_000  # 160 MB of hashes
LEAK_FRACTION = 0.5              # a validation row sharing at least this share of its grams is dropped
BOILERPLATE_ROWS = 4
_PRIME = np.uint64(1_099_511_628_211)
_POWERS = np.array([_PRIME ** np.uint64(j) for j in range(GRAM)], dtype=np.uint64)


KEPT_PUNCTUATION = frozenset("-*/\\%&#@_")  # operators in code: `x-1` and `x 1` are different words


def words(text: str) -> list[str]:
    """The text's words: NFKC, casefold, and Unicode punctuation (P*, but for the operators above) as spaces."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return "".join(" " if unicodedata.category(ch)[0] == "P" and ch not in KEPT_PUNCTUATION else ch
                   for ch in text).split()


def _word_hash(word: str, cache: dict[str, int]) -> int:
    value = cache.get(word)
    if value is None:
        value = cache[word] = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "big")
    return value


def gram_hashes(example: Example, cache: dict[str, int]) -> np.ndarray:
    """The row's word 8-gram hashes (unique), over every string of the row."""
    row_words = [w for s in example.strings() if s for w in words(s)]
    if not row_words:
        return np.zeros(0, dtype=np.uint64)
    ids = np.array([_word_hash(w, cache) for w in row_words], dtype=np.uint64)
    if len(ids) < GRAM:
        ids = np.concatenate([ids, np.zeros(GRAM - len(ids), dtype=np.uint64)])
    with np.errstate(over="ignore"):
        windows = np.lib.stride_tricks.sliding_window_view(ids, GRAM)
        return np.unique((windows * _POWERS).sum(axis=1, dtype=np.uint64))


@dataclass
class OverlapChecker:
    modulus: int = 1
    _chunks: list = field(default_factory=list)
    _count: int = 0
    _rows: int = 0
    _cache: dict = field(default_factory=dict)

    def _sample(self, grams: np.ndarray) -> np.ndarray:
        return grams if self.modulus == 1 else grams[grams % np.uint64(self.modulus) == 0]

    def add_training(self, example: Example) -> None:
        grams = self._sample(gram_hashes(example, self._cache))
        self._chunks.append(grams)
        self._rows += 1
        self._count += len(grams)
        if self._count > MAX_TRAINING_GRAMS:
            self.modulus *= 2
            self._chunks = [self._sample(np.concatenate(self._chunks))]
            self._count = len(self._chunks[0])

    def training_grams(self) -> tuple[np.ndarray, np.ndarray]:
        """(the distinctive training grams, the boilerplate ones), each sorted and unique."""
        if not self._chunks:
            empty = np.zeros(0, dtype=np.uint64)
            return empty, empty
        grams, rows = np.unique(np.concatenate(self._chunks), return_counts=True)
        self._chunks = []
        common = rows > max(BOILERPLATE_ROWS, self._rows // 1000)
        return grams[~common], grams[common]

    def shared_fraction(self, example: Example, training: tuple[np.ndarray, np.ndarray]) -> float:
        """The share of the row's distinctive (sampled) 8-grams that training rows hold too."""
        distinctive, boilerplate = training
        grams = self._sample(gram_hashes(example, self._cache))
        grams = grams[~np.isin(grams, boilerplate, assume_unique=True)]
        if not len(grams):
            return 0.0
        return float(np.isin(grams, distinctive, assume_unique=True).mean())
