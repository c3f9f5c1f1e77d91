"""Exact and normalised de-duplication of rows."""

from __future__ import annotations

import hashlib
import re
import unicodedata

from .formats import Example

_PUNCTUATION_OR_SPACE = re.compile(r"[\W_]+", re.UNICODE)


def exact_key(example: Example) -> bytes:
    return hashlib.blake2b(repr(example).encode(), digest_size=16).digest()


def normalise(text: str) -> str:
    """Case, whitespace and punctuation folded away: 'Hello,  World!' and 'hello world' match."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return _PUNCTUATION_OR_SPACE.sub(" ", text).strip()


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
