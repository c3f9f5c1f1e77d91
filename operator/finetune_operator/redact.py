"""No credential in the operator's logs, at any level.

The libraries that could log one (botocore and urllib3 log request headers, with the access key
id in the Authorization header, at DEBUG) never log below WARNING, --verbose or not; and the
credentials of every Secret in use (one the reconcile judged usable for a job) are registered here
under their job, so that a log record that would carry one (an exception text, a library's message)
shows `[redacted]` instead. A job's values are replaced when its Secret rotates and dropped when it
stops using one or is gone: what is matched is what is in use, never the history.
"""

from __future__ import annotations

import logging
import re
import threading

QUIET_LIBRARIES = ("botocore", "boto3", "s3transfer", "urllib3")
MASK = "[redacted]"
_MIN_LENGTH = 4


class Redactor(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self._owners: dict[str, frozenset[str]] = {}
        self._pattern: re.Pattern[str] | None = None  # rebuilt only when the values in use change
        self._lock = threading.Lock()

    def use(self, owner: str, *values: str | None) -> None:
        """`owner`'s values in use from now on, in place of those it had."""
        kept = frozenset(v for v in values if v and len(v) >= _MIN_LENGTH)
        with self._lock:
            if self._owners.get(owner, frozenset()) == kept:
                return
            if kept:
                self._owners[owner] = kept
            else:
                self._owners.pop(owner, None)
            self._rebuild()

    def forget(self, owner: str) -> None:
        self.use(owner)

    @property
    def values(self) -> frozenset[str]:
        with self._lock:
            return frozenset().union(*self._owners.values())

    def _rebuild(self) -> None:
        # The longest first, so that a value containing another is masked whole.
        values = sorted(frozenset().union(*self._owners.values()), key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, values))) if values else None

    def redact(self, text: str) -> str:
        pattern = self._pattern
        return pattern.sub(MASK, text) if pattern is not None else text

    def filter(self, record: logging.LogRecord) -> bool:
        if self._pattern is not None:
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
