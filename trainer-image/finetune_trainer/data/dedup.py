"""Exact and normalised de-duplication of rows.

The normalised key folds only what does not change a row's meaning: Unicode compatibility forms
(NFKC: full width, ligatures, '…' -> '...'), case (casefold), whitespace runs, and punctuation
(general categories P*: , . ; : ! ? quotes, brackets, Unicode dashes) which all become one space. Kept as
they are: letters, digits, marks (M*: Devanagari vowel signs, Thai tone marks, accents), symbols
(S*: + < = > $ € ≤ ^ | ~), and the ASCII characters Unicode calls punctuation but code uses as
operators or in names: - * / \\ % & # @ _. So `return x+1`, `x-1`, `x * 1` and `x / 1` stay four rows,
while `Hello,  World!` and `hello world` are duplicates."""

from __future__ import annotations

import hashlib
import unicodedata

from .formats import Example

OPERATORS = frozenset("-*/\\%&#@_")


def exact_key(example: Example) -> bytes:
    return hashlib.blake2b(repr(example).encode(), digest_size=16).digest()


def normalise(text: str) -> str:
    """Case, whitespace and punctuation folded away: 'Hello,  World!' and 'hello world' match."""
    text = unicodedata.normalize("NFKC", text).casefold()
    folded = "".join(" " if unicodedata.category(ch)[0] == "P" and ch not in OPERATORS else ch for ch in text)
    return " ".join(folded.split())


def normalised_key(example: Example) -> bytes:
    parts = [example.kind, *(normalise(s) for s in example.strings()), *(role for role, _ in example.messages)]
    return hashlib.blake2b("\x1f".join(parts).encode(), digest_size=16).digest()


class Deduplicator:
    """Remembers 16-byte digests only, so it stays small for large datasets."""

    def __init__(self):
        self._exact: set[bytes] = set()
        self._normalised: set[bytes] = set()

    def duplicate_reason(self, example: Example) -> str | None:
        exact, normalised = exact_key(example), normalised_key(example)
        if exact in self._exact:
            return "duplicate-exact"
        if normalised in self._normalised:
            return "duplicate-normalised"
        self._exact.add(exact)
        self._normalised.add(normalised)
        return None
