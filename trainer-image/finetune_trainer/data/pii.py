"""PII redaction: emails, phone numbers, IP addresses, card numbers and secret keys become placeholders."""

from __future__ import annotations

import re
from collections import Counter

PRIVATE_KEY_BLOCK = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.S)
SECRET_KEYS = re.compile(
    r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"                # AWS access key ids
    r"|\bsk-[A-Za-z0-9_-]{16,}"                     # API keys of the sk-... family
    r"|\bgh[pousr]_[A-Za-z0-9]{30,}\b"              # GitHub tokens
    r"|\bxox[abpr]-[A-Za-z0-9-]{10,}"               # Slack tokens
    r"|\b(?=[A-Za-z0-9+/]*[0-9])(?=[A-Za-z0-9+/]*[A-Z])(?=[A-Za-z0-9+/]*[a-z])[A-Za-z0-9+/]{40}\b"  # AWS secret keys
)
EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
CARD_CANDIDATE = re.compile(r"\b\d(?:[ -]?\d){12,18}\b")
IPV4 = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b")
IPV6 = re.compile(r"\b(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}\b|\b(?:[0-9A-Fa-f]{1,4}:){1,6}:(?:[0-9A-Fa-f]{1,4}:?){1,6}\b")
# Not part of a longer run of digit groups (a failed card number is not a phone number).
PHONE = re.compile(r"(?<![\w.-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]?\d{3,4}(?![\w.]|[ .-]\d)")


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _redact_cards(text: str, counts: Counter) -> str:
    def replace(match: re.Match) -> str:
        digits = re.sub(r"\D", "", match.group())
        if 13 <= len(digits) <= 19 and luhn_valid(digits):
            counts["card"] += 1
            return "[CARD]"
        return match.group()

    return CARD_CANDIDATE.sub(replace, text)


def _sub(pattern: re.Pattern, placeholder: str, kind: str, text: str, counts: Counter) -> str:
    text, n = pattern.subn(placeholder, text)
    counts[kind] += n
    return text


def redact(text: str, counts: Counter | None = None) -> str:
    """Replace PII in text; counts (if given) is incremented per kind. Order matters: keys and
    cards before phone numbers, which would otherwise swallow their digits."""
    counts = counts if counts is not None else Counter()
    text = _sub(PRIVATE_KEY_BLOCK, "[KEY]", "key", text, counts)
    text = _sub(SECRET_KEYS, "[KEY]", "key", text, counts)
    text = _sub(EMAIL, "[EMAIL]", "email", text, counts)
    text = _redact_cards(text, counts)
    text = _sub(IPV4, "[IP]", "ip", text, counts)
    text = _sub(IPV6, "[IP]", "ip", text, counts)
    text = _sub(PHONE, "[PHONE]", "phone", text, counts)
    return text
