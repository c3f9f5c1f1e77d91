"""Exact and normalised de-duplication of rows.

The normalised key folds only differences that cannot change what a row says, and is conservative:
distinct code or math never merges. Each string of a row is folded on its own, in one of two ways.

Every string: canonical Unicode composition (NFC: a precomposed 'é' and 'e' + combining accent are the
same text) and full-/half-width forms to their plain characters ('ｆｕｌｌ' -> 'full'). Nothing else of
Unicode's compatibility folding (NFKC): superscripts, subscripts, fractions, ligatures, circled or
styled letters stay as they are, so `x²+1` and `x2+1` are two rows.

Code or math: a string holding a bracket, an operator or sign (`( ) [ ] { } < > = + * / \\ | ^ ~ `
@ # % & _ $`), a Unicode math symbol (Sm: ≤ ± → ∑ ...) or other number (No: ² ½ ...), or an indented
line after its first (indentation is syntax in Python and YAML) folds only line ends (CRLF, CR) and
trailing whitespace (at the end of each line, blank lines at the start and end). Case, indentation,
spaces, quotes and every punctuation mark count: `if x != 1: return` and `if x = 1: return`, `f(x)`
and `f x`, `X = 1` and `x = 1`, `print("a")` and `print(a)` stay apart.

Prose (any other string): case (casefold), whitespace runs (one space), typographic quotes and
apostrophes to ASCII (“ ” „ « » -> ", ‘ ’ ‚ ‹ › -> '), '…' to '...', and sentence punctuation at the
end of a word: a run of . , ; : ! ? right after a letter, a combining mark or a quote and before a
space or the end is dropped. So `Hello,  World!` and `hello world`, `A, B; C.` and `a b c` are
duplicates, while `return a.b` and `return a b` (the full stop is inside a word), `x1.` and `x1`
(after a digit: `1.` is a number), `a-b` and `a b` (hyphens and dashes are kept) and `"a" b` and
`a b` (quotes are kept) are not. Letters keep their combining marks (M*: Devanagari vowel signs, Thai
tone marks, accents)."""

from __future__ import annotations

import hashlib
import unicodedata

from .formats import Example

CODE_OR_MATH = frozenset("()[]{}<>=+*/\\|^~`@#%&_$")
CODE_OR_MATH_CATEGORIES = frozenset({"Sm", "No"})
SENTENCE_PUNCTUATION = ".,;:!?"
TYPOGRAPHIC = str.maketrans({"“": '"', "”": '"', "„": '"', "‟": '"', "«": '"', "»": '"',
                             "‘": "'", "’": "'", "‚": "'", "‛": "'", "‹": "'", "›": "'", "…": "..."})
QUOTES = "\"'"


def exact_key(example: Example) -> bytes:
    return hashlib.blake2b(repr(example).encode(), digest_size=16).digest()


def _plain_width(ch: str) -> str:
    decomposition = unicodedata.decomposition(ch)
    if decomposition.startswith(("<wide>", "<narrow>")):
        return chr(int(decomposition.split()[1], 16))
    return ch


def is_code_or_math(text: str) -> bool:
    """A code or math character, or an indented line (Python, YAML: indentation is syntax)."""
    return (any(ch in CODE_OR_MATH or unicodedata.category(ch) in CODE_OR_MATH_CATEGORIES for ch in text)
            or any(line[:1] in (" ", "\t") and line.strip() for line in text.splitlines()[1:]))


def _word(word: str) -> str:
    """The word without the sentence punctuation at its end, when that follows a letter, mark or quote."""
    stripped = word.rstrip(SENTENCE_PUNCTUATION)
    if stripped != word and stripped and (unicodedata.category(stripped[-1])[0] in "LM" or stripped[-1] in QUOTES):
        return stripped
    return word


def normalise(text: str) -> str:
    """The folded string: 'Hello,  World!' and 'hello world' match, 'f(x)' and 'f x' do not."""
    text = "".join(_plain_width(ch) for ch in unicodedata.normalize("NFC", text))
    if is_code_or_math(text):
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        return "\n".join(line.rstrip() for line in lines).strip("\n")
    return " ".join(_word(word) for word in text.translate(TYPOGRAPHIC).casefold().split())


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
