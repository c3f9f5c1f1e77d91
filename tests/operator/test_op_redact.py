"""No credential in the operator's logs: the redactor and the quiet libraries."""

from __future__ import annotations

import base64
import logging

import pytest

from finetune_operator import redact, s3


def test_registered_values_are_redacted_in_messages_arguments_and_tracebacks(caplog):
    redactor = redact.Redactor()
    redactor.register("AKIAEXAMPLEKEY", "s3cr3t-value", None, "")
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


@pytest.mark.parametrize("key", ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"])
def test_each_credential_decoded_from_a_secret_is_redacted_from_the_logs(caplog, key):
    values = {k: f"{k.lower()}-value-of-test-{key.lower()}" for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                                       "AWS_SESSION_TOKEN")}
    s3.Credentials.from_secret_data({k: base64.b64encode(v.encode()).decode() for k, v in values.items()})
    logger = logging.getLogger("test.redact.secret")
    logger.addFilter(redact.REDACTOR)
    try:
        with caplog.at_level(logging.DEBUG, logger="test.redact.secret"):
            logger.warning("S3 request failed: %s=%s", key, values[key])
    finally:
        logger.removeFilter(redact.REDACTOR)
    assert values[key] not in caplog.text and redact.MASK in caplog.text


def test_short_values_are_not_registered():
    redactor = redact.Redactor()
    redactor.register("ab")
    assert redactor.redact("ab cd") == "ab cd"


def test_chatty_libraries_stay_at_warning_even_when_verbose():
    logging.getLogger("botocore").setLevel(logging.DEBUG)
    redact.install()
    for name in redact.QUIET_LIBRARIES:
        assert logging.getLogger(name).getEffectiveLevel() >= logging.WARNING
