"""What stops a FineTuneJob: a reason (CamelCase, the condition's reason) and a message naming the field."""

from __future__ import annotations

import re
from dataclasses import dataclass

# An image pinned by digest.
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


def image_from(image: str, prefixes: list[str]) -> bool:
    """Whether `image` is under one of the allowed registry/repository prefixes, matched at a
    boundary: `registry.example.com` allows `registry.example.com/x:1` but not
    `registry.example.com.evil.io/x` or `registry.example.com-x/y`; `registry.example.com/team`
    allows `.../team/trainer`, `.../team:tag` and `.../team@sha256:...`, not `.../team-b/x`."""
    for prefix in prefixes:
        if not prefix:
            continue
        if prefix.endswith("/") and image.startswith(prefix) and len(image) > len(prefix):
            return True
        if image.startswith(prefix) and image[len(prefix):len(prefix) + 1] in ("/", ":", "@"):
            return True
    return False


@dataclass(frozen=True)
class Problem:
    reason: str
    message: str

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"
