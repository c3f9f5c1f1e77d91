"""PII redaction: emails, phone numbers, IP addresses, card numbers and secret keys become placeholders.

Candidates found by a regex are validated before they are replaced, so code and ordinary numbers survive:

* Phone numbers need a real phone shape: NANP 3-3-4 (optional +1 or 1, area code in parentheses or
  not, separated by space, '.' or '-'; ten bare digits only as [2-9]XX[2-9]XXXXXX); international
  '+' country code and further digit groups, 8 to 15 digits in all (E.164); national numbers with a
  trunk 0 (`020 7946 0958`, `030 12345678`, `01 23 45 67 89`), separated groups, 10 or 11 digits.
  The number must stand alone: not glued to a word, '.', '+', '-' or '/' in front, and not followed
  by a word character or by another digit group (`555-123-4567-8901`, 4-4-4 runs, dates and
  times are not phones). A full stop or other punctuation after it is fine.
* IPv4: a dotted quad that `ipaddress` accepts, unless it is part of a longer dotted number run
  (`3.11.7.2.1`), glued to a word (`v3.11.7.2`), or in a version context:
  - after a version word (`version`, `release`, `ver`, `v`) or a name holding `version` or `release`
    (`__version__`, `APP_VERSION`, `AssemblyVersion`, `versionName`), then at most a quote, one
    of - . : = ( := == >= <= ~= != ?=, and a quote (`__version__ = "1.2.3.4"`, `"version": "1.2.3.4"`,
    `AssemblyVersion("1.2.3.4")`, `release-1.2.3.4`);
  - in a requirement specifier: a distribution name (letters, digits, '-' and '_', no dots; extras
    in brackets allowed) glued to == === ~= >= <= != (`foo==1.2.3.4`, `torch>=2.1.0.1`), unless the
    name speaks of an address (ip, addr, host, server, src, dst, ...: `ip==10.1.2.3` and
    `server_ip==10.1.2.3` are redacted). A dotted name (`ip.addr==10.1.2.3`, a Wireshark filter) or a
    comparison with spaces (`x == 10.1.2.3`) is no requirement.
  Everything else is an address: `host 10.1.2.3`, and also `torch 2.1.0.1` (a package name and a
  space cannot be told from a host name and a space; a leaked address costs more than a version).
* IPv6: a colon group run that `ipaddress` accepts as an IPv6Address, holding a decimal digit, not
  mixing upper- and lower-case letters, and having a hex letter or at least three groups. So
  `2001:db8::1` and `fe80::1ff:fe23:4567:890a` are addresses, while `a[1::2]`, `Face::Add`, `a::b`,
  `::` and `::1` (loopback) are not.
* Cards: 13-19 digits passing the Luhn check. Keys and emails: by their known shapes.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from typing import Callable

PRIVATE_KEY_BLOCK = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.S)
SECRET_KEYS = re.compile(
    r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"                # AWS access key ids
    r"|\bsk-[A-Za-z0-9_-]{16,}"                     # API keys of the sk-... family
    r"|\bgh[pousr]_[A-Za-z0-9]{30,}\b"              # GitHub tokens
    r"|\bxox[abpr]-[A-Za-z0-9-]{10,}"               # Slack tokens
    r"|(?<![A-Za-z0-9+/])(?=[A-Za-z0-9+/]{40}\b)(?=[A-Za-z0-9+/]{0,39}[0-9])(?=[A-Za-z0-9+/]{0,39}[A-Z])"
    r"(?=[A-Za-z0-9+/]{0,39}[a-z])[A-Za-z0-9+/]{40}\b"  # AWS secret keys (bounded look-aheads: linear time)
)
# Starts only where a run of local-part characters starts, so long runs without an @ cost linear time.
EMAIL = re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
CARD_CANDIDATE = re.compile(r"\b\d(?:[ -]?\d){12,18}\b")

IPV4 = re.compile(r"(?<![\w.])\d{1,3}(?:\.\d{1,3}){3}(?!\w|\.\d)")
VERSION_CONTEXT = re.compile(r"(?:\b(?:ver|v)|[A-Za-z0-9_]*(?:version|release)[A-Za-z0-9_]*)"
                             r"[\"']?[ \t]*(?:[-.:=(]|[:?!<>~=]=)?[ \t]*[\"']?$", re.I)
REQUIREMENT = re.compile(r"(?:^|[\s\"'\[(,;])(?P<name>[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?)(?:\[[\w,\s-]*\])?"
                         r"(?:===|==|~=|>=|<=|!=)$")
ADDRESS_WORDS = frozenset({"ip", "ipv4", "ip4", "addr", "address", "host", "hostname", "server", "src", "dst", "source",
                           "destination", "client", "peer", "remote", "gateway", "gw", "dns", "nameserver", "net",
                           "subnet", "proxy", "router", "node", "endpoint", "target"})
IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]{1,4})?(?![\w:]|\.\d)")

_SEP = r"[ .-]"
PHONE = re.compile(
    r"(?<![\w.+/-])(?:"
    rf"(?P<intl>\+[1-9]\d{{0,2}}(?:{_SEP}?(?:\(\d{{1,4}}\)|\d{{1,5}})){{1,6}})"                      # +44 20 7946 0958
    rf"|(?P<nanp>(?:\+?1{_SEP}?)?(?:\([2-9]\d\d\){_SEP}?|[2-9]\d\d{_SEP})\d{{3}}{_SEP}\d{{4}})"       # (415) 555-0132
    r"|(?P<bare>[2-9]\d\d[2-9]\d{6})"                                                                  # 4155550132
    rf"|(?P<national>(?:\(0[1-9]\d{{0,3}}\)|0[1-9]\d{{0,3}})(?:{_SEP}\d{{2,8}}){{1,4}})"              # 020 7946 0958
    rf")(?!\w|{_SEP}?\d)"
)


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _digits(s: str) -> str:
    return re.sub(r"\D", "", s)


def _is_card(m: re.Match) -> bool:
    digits = _digits(m.group())
    return 13 <= len(digits) <= 19 and luhn_valid(digits)


def _names_an_address(name: str) -> bool:
    """Whether a name's words (split at '_', '-' and case changes) speak of a network address."""
    words = [w.lower() for w in re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+", name)]
    singular = [w[:-1] if w.endswith("s") and len(w) > 3 else w for w in words]  # nodes, hosts, ips
    return any(w in ADDRESS_WORDS or w.endswith(("ip", "addr", "host")) for w in words + singular)


def _in_requirement(text: str, start: int) -> bool:
    """Whether the candidate at start follows a requirement specifier's name and operator (`foo==`)."""
    lo = max(0, start - 80)
    # Searching from 1 when the window is cut: its first character can only be the boundary before a name.
    m = REQUIREMENT.search(text[lo:start], 0 if lo == 0 else 1)
    return m is not None and not _names_an_address(m.group("name"))


def _is_ipv4(m: re.Match) -> bool:
    try:
        ipaddress.IPv4Address(m.group())
    except ValueError:
        return False
    before = m.string[max(0, m.start() - 40):m.start()]
    return not VERSION_CONTEXT.search(before) and not _in_requirement(m.string, m.start())


def _is_ipv6(m: re.Match) -> bool:
    s = m.group()
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return False
    groups = [g for g in re.split(r"[:.]", s) if g]
    mixed_case = any(c.isupper() for c in s) and any(c.islower() for c in s)
    hex_letter = any(c in "abcdefABCDEF" for c in s)
    return any(c.isdigit() for c in s) and not mixed_case and (hex_letter or len(groups) >= 3)


def _is_phone(m: re.Match) -> bool:
    n = len(_digits(m.group()))
    if m.group("intl"):
        return 8 <= n <= 15
    if m.group("national"):
        return 10 <= n <= 11
    return True


def _sub(pattern: re.Pattern, placeholder: str, kind: str, text: str, counts: Counter,
         valid: Callable[[re.Match], bool] = lambda m: True) -> str:
    def replace(m: re.Match) -> str:
        if not valid(m):
            return m.group()
        counts[kind] += 1
        return placeholder

    return pattern.sub(replace, text)


def redact(text: str, counts: Counter | None = None) -> str:
    """Replace PII in text; counts (if given) is incremented per kind. Order matters: keys and
    cards before phone numbers, which would otherwise swallow their digits; IPv6 before IPv4 so an
    IPv4-mapped address is replaced whole; addresses before phone numbers."""
    counts = counts if counts is not None else Counter()
    text = _sub(PRIVATE_KEY_BLOCK, "[KEY]", "key", text, counts)
    text = _sub(SECRET_KEYS, "[KEY]", "key", text, counts)
    text = _sub(EMAIL, "[EMAIL]", "email", text, counts)
    text = _sub(CARD_CANDIDATE, "[CARD]", "card", text, counts, _is_card)
    text = _sub(IPV6, "[IP]", "ip", text, counts, _is_ipv6)
    text = _sub(IPV4, "[IP]", "ip", text, counts, _is_ipv4)
    text = _sub(PHONE, "[PHONE]", "phone", text, counts, _is_phone)
    return text
