"""No credential in the operator's logs: the redactor and the quiet libraries."""

from __future__ import annotations

import logging

import pytest

from finetune_operator import redact


def test_values_in_use_are_redacted_in_messages_arguments_and_tracebacks(caplog):
    redactor = redact.Redactor()
    redactor.use("job-a", "AKIAEXAMPLEKEY", "s3cr3t-value", None, "")
    logger = logging.getLogger("test.redact")
    logger.addFilter(redactor)
    try:
        with caplog.at_level(logging.DEBUG, logger="test.redact"):
            logger.debug("headers: Authorization=AWS4 Credential=%s/20260101", "AKIAEXAMPLEKEY")
            try:
                raise ValueError("bad secret s3cr3t-value")
            except ValueError:
                logger.exception("failed")
    finally:
        logger.removeFilter(redactor)
    text = caplog.text
    assert "AKIAEXAMPLEKEY" not in text and "s3cr3t-value" not in text
    assert text.count(redact.MASK) >= 2


LIFECYCLE = [
    # what happens to the jobs' Secrets (owner, values; () forgets), values then redacted, values then not
    ("in use", [("a", ("key-a1", "secret-a1"))], {"key-a1", "secret-a1"}, set()),
    ("rotated: the old values go", [("a", ("key-a1", "secret-a1")), ("a", ("key-a2", "secret-a2"))],
     {"key-a2", "secret-a2"}, {"key-a1", "secret-a1"}),
    ("no longer used", [("a", ("key-a1", "secret-a1")), ("a", ())], set(), {"key-a1", "secret-a1"}),
    ("two jobs share a Secret: one stops, the other still uses it",
     [("a", ("shared-key",)), ("b", ("shared-key",)), ("a", ())], {"shared-key"}, set()),
    ("one job's rotation leaves another's values", [("a", ("key-a1",)), ("b", ("key-b1",)), ("a", ("key-a2",))],
     {"key-a2", "key-b1"}, {"key-a1"}),
    ("short values are never matched", [("a", ("ab", "xyz", "", None))], set(), {"ab", "xyz"}),
]


@pytest.mark.parametrize("what, steps, redacted, kept", LIFECYCLE, ids=[c[0] for c in LIFECYCLE])
def test_only_the_values_in_use_are_redacted(what, steps, redacted, kept):
    redactor = redact.Redactor()
    for owner, values in steps:
        redactor.use(owner, *values)
    assert redactor.values == redacted
    for value in redacted:
        assert redactor.redact(f"x {value} y") == f"x {redact.MASK} y"
    for value in kept:
        assert redactor.redact(f"x {value} y") == f"x {value} y"


def test_matching_does_not_grow_with_history():
    """10,000 Secrets that came and went leave nothing to match; the pattern is rebuilt only on a change."""
    redactor = redact.Redactor()
    for i in range(10_000):
        redactor.use(f"job-{i}", f"key-{i:05d}", f"secret-{i:05d}")
        redactor.forget(f"job-{i}")
    assert redactor.values == frozenset() and redactor._pattern is None
    redactor.use("job", "key-in-use")
    pattern = redactor._pattern
    redactor.use("job", "key-in-use")  # the same values again (every pass): nothing to rebuild
    assert redactor._pattern is pattern and redactor.redact("key-00001 key-in-use") == f"key-00001 {redact.MASK}"


def test_a_value_containing_another_is_masked_whole():
    redactor = redact.Redactor()
    redactor.use("a", "abcd")
    redactor.use("b", "abcdefgh")
    assert redactor.redact("abcdefgh abcd") == f"{redact.MASK} {redact.MASK}"


def test_chatty_libraries_stay_at_warning_even_when_verbose():
    logging.getLogger("botocore").setLevel(logging.DEBUG)
    redact.install()
    for name in redact.QUIET_LIBRARIES:
        assert logging.getLogger(name).getEffectiveLevel() >= logging.WARNING
