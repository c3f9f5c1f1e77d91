"""User checks on an answer: it contains a string, or a regular expression finds a match in it.

Patterns are Python `re`, vetted like the content filters' (config.ContentFilter): one that does not
compile or nests unbounded repetitions, as in (a+)+, is refused; a long answer is searched in the
overlapping windows of data.filters.RegexMatcher, which bounds the cost of one search.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..config import ContentFilter
from ..data.filters import RegexMatcher
from ..errors import ConfigError


def pattern_problem(pattern: str) -> str | None:
    """Why a pattern is refused, or None when it is usable."""
    try:
        re.compile(pattern)
    except re.error as e:
        return f"{pattern!r} is not a valid regular expression: {e}"
    if ContentFilter.nests_unbounded_repeats(pattern):
        return (f"{pattern!r} nests unbounded repetitions (as in (a+)+), whose backtracking can take exponential "
                "time; use a possessive quantifier (a++) or an atomic group (?>...)")
    return None


@dataclass(frozen=True)
class Check:
    """Passes when the answer contains `contains`, or when `pattern` matches somewhere in it; exactly one of
    the two is given. ConfigError when the check is malformed."""

    name: str
    contains: str | None = None
    pattern: str | None = None
    ignoreCase: bool = True  # as the config's AnswerCheck
    _matcher: RegexMatcher | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("a check needs a name")
        if (self.contains is None) == (self.pattern is None):
            raise ConfigError(f"check {self.name}: give exactly one of contains and pattern")
        if self.contains == "" or self.pattern == "":
            raise ConfigError(f"check {self.name}: an empty contains or pattern would pass every answer")
        if self.pattern is not None:
            problem = pattern_problem(self.pattern)
            if problem:
                raise ConfigError(f"check {self.name}: pattern {problem}")
            # An inline flag keeps RegexMatcher's own compilation; global flags may follow one another.
            flagged = f"(?i){self.pattern}" if self.ignoreCase else self.pattern
            object.__setattr__(self, "_matcher", RegexMatcher([flagged]))

    def passes(self, answer: str) -> bool:
        if self._matcher is not None:
            return self._matcher.find([answer])[0] is not None
        if self.ignoreCase:
            return self.contains.casefold() in answer.casefold()
        return self.contains in answer

    def rate(self, answers: list[str]) -> float:
        """The share of answers that pass; ValueError on no answers."""
        if not answers:
            raise ValueError(f"check {self.name}: no answers to check")
        return sum(self.passes(a) for a in answers) / len(answers)
