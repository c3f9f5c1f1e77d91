"""No credential in the operator's logs, at any level.

The libraries that could log one (botocore and urllib3 log request headers, with the access key
id in the Authorization header, at DEBUG) never log below WARNING, --verbose or not; and every
credential value the operator decodes is registered here, so that a log record that would carry
it (an exception text, a library's message) shows `[redacted]` instead.
"""

from __future__ import annotations

import logging
import threading

QUIET_LIBRARIES = ("botocore", "boto3", "s3transfer", "urllib3")
MASK = "[redacted]"
_MIN_LENGTH = 4


class Redactor(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self._secrets: set[str] = set()
        self._lock = threading.Lock()

    def register(self, *values: str | None) -> None:
        with self._lock:
            self._secrets.update(v for v in values if v and len(v) >= _MIN_LENGTH)

    def redact(self, text: str) -> str:
        for secret in sorted(self._secrets, key=len, reverse=True):
            if secret in text:
                text = text.replace(secret, MASK)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if self._secrets:
            message = record.getMessage()
            redacted = self.redact(message)
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = self.redact(record.exc_text)
            if redacted != message:
                record.msg, record.args = redacted, None
        return True


REDACTOR = Redactor()


def install() -> None:
    """Redact on every handler of the root logger; keep the chatty libraries at WARNING."""
    for handler in logging.getLogger().handlers:
        if REDACTOR not in handler.filters:
            handler.addFilter(REDACTOR)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)
