"""What stops a FineTuneJob: a reason (CamelCase, the condition's reason) and a message naming the field."""

from __future__ import annotations

import re
from dataclasses import dataclass

# An image pinned by digest.
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class Problem:
    reason: str
    message: str

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"
