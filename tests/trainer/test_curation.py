"""Data curation on known inputs: what PII redaction must replace and must leave alone, and which rows
de-duplication treats as the same."""

from __future__ import annotations

from collections import Counter

import pytest

from finetune_trainer.data import dedup, pii
from finetune_trainer.data.formats import Example


def _redact(text: str) -> tuple[str, dict[str, int]]:
    counts = Counter()
    redacted = pii.redact(text, counts)
    return redacted, {k: v for k, v in counts.items() if v}


# (text, redacted text, replacements by kind)
PII_CASES = [
    ("mail me at jane.doe+work@example.co.uk today", "mail me at [EMAIL] today", {"email": 1}),
    ("call +1 415-555-0132 now", "call [PHONE] now", {"phone": 1}),
    ("call (415) 555-0132", "call [PHONE]", {"phone": 1}),
    ("office 020 7946 0958", "office [PHONE]", {"phone": 1}),
    ("server 10.0.12.7 is down", "server [IP] is down", {"ip": 1}),
    ("v6 2001:0db8:85a3:0000:0000:8a2e:0370:7334 up", "v6 [IP] up", {"ip": 1}),
    ("card 4111 1111 1111 1111 expires", "card [CARD] expires", {"card": 1}),
    ("key AKIAIOSFODNN7EXAMPLE leaked", "key [KEY] leaked", {"key": 1}),
    ("token sk-proj_abcdefghijklmnop1234 here", "token [KEY] here", {"key": 1}),
    ("secret wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY ok", "secret [KEY] ok", {"key": 1}),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY----- done", "[KEY] done", {"key": 1}),
    ("a@b.io and 192.168.1.1", "[EMAIL] and [IP]", {"email": 1, "ip": 1}),
]

PHONE_CASES = [
    # finding 3: a full stop (or other sentence end) after the number
    ("Call me at 555-123-4567.", "Call me at [PHONE].", {"phone": 1}),
    ("call (415) 555-0132.", "call [PHONE].", {"phone": 1}),
    ("London: +44 20 7946 0958.", "London: [PHONE].", {"phone": 1}),
    ("is it 555-123-4567?", "is it [PHONE]?", {"phone": 1}),
    ("ring 555.123.4567, then leave", "ring [PHONE], then leave", {"phone": 1}),
    # ten bare digits
    ("call 4155550132", "call [PHONE]", {"phone": 1}),
    ("phone 4155550132.", "phone [PHONE].", {"phone": 1}),
    ("tel: 4155550132", "tel: [PHONE]", {"phone": 1}),
    ("4155550132", "[PHONE]", {"phone": 1}),
    # NANP variants
    ("+1 (415) 555-0132 works", "[PHONE] works", {"phone": 1}),
    ("toll free 1-800-555-0199.", "toll free [PHONE].", {"phone": 1}),
    ("phone:555-123-4567", "phone:[PHONE]", {"phone": 1}),
    ("(415)555-0132", "[PHONE]", {"phone": 1}),
    # international
    ("Berlin +49 30 12345678", "Berlin [PHONE]", {"phone": 1}),
    ("Paris +33 1 23 45 67 89.", "Paris [PHONE].", {"phone": 1}),
    ("+14155550132", "[PHONE]", {"phone": 1}),
    ("UK +44 (0)20 7946 0958 ok", "UK [PHONE] ok", {"phone": 1}),
    ("tel:+1-415-555-0132", "tel:[PHONE]", {"phone": 1}),
    # national numbers with a trunk 0
    ("(020) 7946 0958", "[PHONE]", {"phone": 1}),
    ("Berlin 030 12345678.", "Berlin [PHONE].", {"phone": 1}),
    ("Paris 01 23 45 67 89", "Paris [PHONE]", {"phone": 1}),
    ("both 555-123-4567 and 020 7946 0958.", "both [PHONE] and [PHONE].", {"phone": 2}),
]

IP_CASES = [
    ("ping 2001:db8::1 now", "ping [IP] now", {"ip": 1}),
    ("link fe80::1ff:fe23:4567:890a.", "link [IP].", {"ip": 1}),
    ("mapped ::ffff:192.0.2.1 here", "mapped [IP] here", {"ip": 1}),
    ("upper 2001:DB8::8A2E:370:7334", "upper [IP]", {"ip": 1}),
    ("Server at 192.168.0.1.", "Server at [IP].", {"ip": 1}),
    ("host 10.0.0.1:8080", "host [IP]:8080", {"ip": 1}),
    # a valid dotted quad without version context is an address, whatever it looks like
    ("the host at 3.11.7.2 is down", "the host at [IP] is down", {"ip": 1}),
    ("(10.1.2.3)", "([IP])", {"ip": 1}),
    # issue 13: version contexts stay narrow; an address after a host word, a filter or a plain name is redacted
    ("connect from host 10.1.2.3", "connect from host [IP]", {"ip": 1}),
    ("version 2 of the app runs on 10.1.2.3", "version 2 of the app runs on [IP]", {"ip": 1}),
    ("ip==10.1.2.3", "ip==[IP]", {"ip": 1}),
    ("ip.addr == 10.1.2.3", "ip.addr == [IP]", {"ip": 1}),
    ("ip.src==10.1.2.3", "ip.src==[IP]", {"ip": 1}),
    ("server_ip==10.1.2.3 and serverIp==10.1.2.4", "server_ip==[IP] and serverIp==[IP]", {"ip": 2}),
    ("host>=10.1.2.3", "host>=[IP]", {"ip": 1}),
    ("nodes==10.1.2.3 or upstream_hosts~=10.1.2.4", "nodes==[IP] or upstream_hosts~=[IP]", {"ip": 2}),
    ("foo == 10.1.2.3", "foo == [IP]", {"ip": 1}),   # a comparison with spaces is not a requirement
    ('server = "10.1.2.3"', 'server = "[IP]"', {"ip": 1}),
    ("HOST=10.1.2.3", "HOST=[IP]", {"ip": 1}),
    # a package name and a space cannot be told from a host name and a space: redacted (by design)
    ("torch 2.1.0.1", "torch [IP]", {"ip": 1}),
]

# Neither PII nor changed: code, versions, dates, times, order and card-like numbers.
NOT_PII = [
    # finding 4
    "a[1::2]",
    "Face::Add",
    "version 3.11.7.2",
    "order 2023 4567 8901",
    # C++ / Rust paths and slices
    "std::vec",
    "use std::vec::Vec;",
    "a::b",
    "x = y[::-1]",
    "x[10::3]",
    "Face::Add2(x)",
    "dead::beef",
    "::",
    "loopback ::1",
    # versions and longer dotted runs
    "release 3.11.7.2",
    "Version: 1.2.3.4",
    "v3.11.7.2",
    "3.11.7.2.1",
    "see 1.2.3.4.5",
    "version 1.2.3 and 42 apples in 2024",
    "not an address 256.1.1.1",
    # issue 13: four-part versions in assignments, metadata and requirement specifiers
    '__version__ = "1.2.3.4"',
    "__version__ = '1.2.3.4'",
    'version = "1.2.3.4"',
    'version="1.2.3.4"',
    '{"version": "1.2.3.4"}',
    "version: 1.2.3.4",
    "VERSION=1.2.3.4",
    "APP_VERSION := 1.2.3.4",
    '[assembly: AssemblyVersion("1.2.3.4")]',
    'versionName "1.2.3.4"',
    "release-1.2.3.4",
    "foo==1.2.3.4",
    "pip install foo==1.2.3.4 bar>=2.0.0.1",
    "torch>=2.1.0.1",
    "foo~=1.2.3.4",
    "foo<=1.2.3.4",
    "foo!=1.2.3.4",
    "foo===1.2.3.4",
    'install_requires=["foo>=1.2.3.4,<2", "bar-baz==1.2.3.4"]',
    "requests[socks]==2.31.0.1",
    # digit groups that are not phones
    "card 4111-1111-1111-1112 is not a card",
    "order 0123 4567 8901",
    "ref 555-123-4567-8901",
    "date 2024-01-15",
    "on 2024-01-15T10:30:00Z",
    "dates 01-15-2024 and 01.02.2024",
    "at 10:30:45",
    "12:30",
    "MAC 00:1a:2b:3c:4d:5e",
    "id_4155550132",
    "x4155550132",
    "0x4155550132",
    "epoch 1700000000 seconds",
    "pi 3.1415926535",
    "count = 1,234,567,890",
    "ISBN 978-3-16-148410-0",
    "UTC+1 2024-01-15",
    "sum(+12345)",
    "build 20240115",
    "SKU-415-555-0132",
]


@pytest.mark.parametrize("text,expected,kinds", PII_CASES + PHONE_CASES + IP_CASES)
def test_pii_is_redacted(text, expected, kinds):
    assert _redact(text) == (expected, kinds)


@pytest.mark.parametrize("text", NOT_PII)
def test_not_pii_is_left_alone(text):
    assert _redact(text) == (text, {})


DEDUP_CASES = [
    # (rows as texts, expected reasons per row)
    (["Hello world", "Hello world"], [None, "duplicate-exact"]),
    (["Hello world", "hello,   WORLD!"], [None, "duplicate-normalised"]),
    (["Hello world", "Hello there world"], [None, None]),
    # '-' is kept (it is an operator in code), so A-B-C is no longer a duplicate of a b c
    (["a b c", "A-B-C", "a b c", "abc"], [None, None, "duplicate-exact", None]),
    (["a b c", "A, B; C."], [None, "duplicate-normalised"]),
    # finding 5: operators are not punctuation
    (["return x+1", "return x-1", "return x * 1", "return x / 1"], [None, None, None, None]),
    (["x = a % b", "x = a & b", "x = a # b", "x = a @ b", "x = a b"], [None] * 5),
    (["x ≤ 1", "x < 1", "x = 1"], [None, None, None]),
    (["price $5", "price €5"], [None, None]),
    (["foo_bar", "foo bar"], [None, None]),
    # prose punctuation, case, width and whitespace fold away
    (["Hello,  World!", "hello world"], [None, "duplicate-normalised"]),
    (["“Quoted” text…", '"quoted" text...'], [None, "duplicate-normalised"]),
    (["«Bonjour», dit-il", "“bonjour”, dit-il"], [None, "duplicate-normalised"]),
    (["Straße", "STRASSE"], [None, "duplicate-normalised"]),
    (["ｆｕｌｌ ｗｉｄｔｈ", "full width"], [None, "duplicate-normalised"]),
    (["tab\tand\nnewline", "tab and  newline"], [None, "duplicate-normalised"]),
    # finding 5: combining marks (vowel signs, tone marks) are letters of the word
    (["किताब", "कताब", "कीताब"], [None, None, None]),
    (["दिन", "दीन"], [None, None]),
    (["ขาว", "ข่าว", "ข้าว"], [None, None, None]),
    (["café", "cafe"], [None, None]),
    (["café", "CAFÉ!"], [None, "duplicate-normalised"]),
    # issue 13: code punctuation is not prose punctuation: `!=`, `.`, brackets and quotes count
    (["if x != 1: return", "if x = 1: return", "if x == 1: return"], [None, None, None]),
    (["return a.b", "return a b", "return ab"], [None, None, None]),
    (["f(x)", "f x", "f[x]", "f{x}", "f<x>"], [None] * 5),
    (['print("a")', "print(a)", "print('a')", "print(“a”)"], [None] * 4),
    (["f(a, b)", "f(a b)"], [None, None]),
    (["x = 1.", "x = 1"], [None, None]),
    (["x = y; z", "x = y z"], [None, None]),
    # ... and in code and math, case and indentation count too
    (["X = 1", "x = 1"], [None, None]),
    (["if a:\n    b\nc", "if a:\n    b\n    c", "if a:\n  b\nc"], [None, None, None]),
    # Unicode compatibility folding is not applied: superscripts, subscripts, fractions are not digits
    (["x²+1", "x2+1"], [None, None]),
    (["x₁ + y", "x1 + y"], [None, None]),
    (["½ cup", "1/2 cup", "12 cup"], [None, None, None]),
    (["area in m²", "area in m2"], [None, None]),
    # prose: sentence punctuation at the end of a word only, after a letter; quotes and dashes count
    (["the file.txt is here", "the file txt is here"], [None, None]),
    (["It costs 5.", "it costs 5"], [None, None]),
    (['He said "no"', "He said no"], [None, None]),
    (["well-known", "well known"], [None, None]),
    # ... while case, whitespace, trailing sentence punctuation and typography still fold
    (["See the docs.", "see the docs", "See the docs!", "see the docs?!"], [None] + ["duplicate-normalised"] * 3),
    (["Wait... what", "wait what", "Wait… what"], [None] + ["duplicate-normalised"] * 2),
    (["Don’t stop", "don't stop"], [None, "duplicate-normalised"]),
    (["cafe\u0301 au lait", "café au lait"], [None, "duplicate-normalised"]),
    (["return x+1  \n\n", "return x+1", "\r\nreturn x+1\r\n"], [None] + ["duplicate-normalised"] * 2),
    (["if a:\r\n    b \r\n", "if a:\n    b"], [None, "duplicate-normalised"]),
    (["ｆ（ｘ）", "f(x)"], [None, "duplicate-normalised"]),
]


@pytest.mark.parametrize("texts,reasons", DEDUP_CASES)
def test_deduplication(texts, reasons):
    d = dedup.Deduplicator()
    assert [d.duplicate_reason(Example(kind="text", text=t)) for t in texts] == reasons


# ---- validation rows that leak from training (overlap.py) -------------------------------------------

def _chat(system: str, user: str, answer: str) -> Example:
    import json

    from finetune_trainer.data.formats import parse_line

    row = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user},
                        {"role": "assistant", "content": answer}]}
    return parse_line(json.dumps(row), "chat", "rows.jsonl", 1)


SYSTEM = "You are the support assistant of the platform team and you answer in two short sentences at most."


def _distinct(i: int) -> str:
    """A sentence of its own per i: no word 8-gram in common with another i."""
    return " ".join(f"w{i}x{j}" for j in range(12))


def test_a_prompt_every_training_row_holds_is_boilerplate_not_leakage():
    from finetune_trainer.data import overlap

    checker = overlap.OverlapChecker()
    for i in range(overlap.BOILERPLATE_ROWS + 6):
        checker.add_training(_chat(SYSTEM, _distinct(i), _distinct(1000 + i)))
    training = checker.training_grams()
    fresh = _chat(SYSTEM, _distinct(5000), _distinct(6000))       # the shared system prompt only
    leaked = _chat(SYSTEM, _distinct(3), _distinct(1003))          # a training row again
    assert checker.shared_fraction(fresh, training) == 0.0
    assert checker.shared_fraction(leaked, training) == 1.0
    rare = overlap.OverlapChecker()                                # the same prompt in few rows: it counts
    for i in range(overlap.BOILERPLATE_ROWS):
        rare.add_training(_chat(SYSTEM, _distinct(i), _distinct(1000 + i)))
    assert rare.shared_fraction(fresh, rare.training_grams()) > 0.3


def test_past_its_memory_bound_the_checker_samples_and_still_tells_leaks_apart(monkeypatch):
    from finetune_trainer.data import overlap

    monkeypatch.setattr(overlap, "MAX_TRAINING_GRAMS", 200)
    checker = overlap.OverlapChecker()
    for i in range(60):
        checker.add_training(_chat(f"system {i}", _distinct(i) + " " + _distinct(100 + i), _distinct(200 + i)))
    assert checker.modulus > 1 and checker._count <= 200
    training = checker.training_grams()
    leaked = [checker.shared_fraction(_chat(f"system {i}", _distinct(i) + " " + _distinct(100 + i), _distinct(200 + i)),
                                      training) for i in range(60)]
    fresh = [checker.shared_fraction(_chat("another", _distinct(700 + i), _distinct(800 + i)), training)
             for i in range(60)]
    assert sum(f >= overlap.LEAK_FRACTION for f in leaked) >= 55  # a row whose grams all fell outside the sample scores 0
    assert max(fresh) == 0.0
