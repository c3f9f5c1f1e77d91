"""docs/benchmarks.md is written by several tools and by hand: `python -m bench` rewrites only its own
sections and keeps everything else.

Kept, in the order they stand: every block between `<!-- NAME:begin -->` and `<!-- NAME:end -->`
(written by bench.operator_scale, bench.hostile_tenants, bench.gpu, ...), and every `## ` section
outside such blocks whose heading is not one `python -m bench` writes (hand-written sections such as
"Work lost to a preemption").
"""

from __future__ import annotations

import re
from pathlib import Path

MARKED = re.compile(r"<!-- ([A-Za-z0-9_-]+):begin -->.*?<!-- \1:end -->", re.DOTALL)


def _plain_sections(chunk: str, own_headings: set[str]) -> list[str]:
    """The `## ` sections of a chunk without markers whose heading is not ours (text before the first heading is dropped)."""
    kept = []
    parts = re.split(r"(?m)^(?=## )", chunk)
    for part in parts:
        if not part.startswith("## "):
            continue
        heading = part.splitlines()[0][3:].strip()
        if heading not in own_headings:
            kept.append(part.strip("\n"))
    return kept


def kept_sections(path: Path, own_headings: set[str]) -> list[str]:
    """The parts of the report at `path` that other tools or people wrote, in their order."""
    text = path.read_text() if path.exists() else ""
    kept, position = [], 0
    for match in MARKED.finditer(text):
        kept += _plain_sections(text[position:match.start()], own_headings)
        kept.append(match.group(0))
        position = match.end()
    kept += _plain_sections(text[position:], own_headings)
    return kept


def marked_names(sections: list[str]) -> set[str]:
    return {m.group(1) for s in sections for m in [MARKED.match(s)] if m}


def write_section(path: Path, section: str, start_marker: str, end_marker: str) -> None:
    """Replace the block between the markers (markers included in `section`), or append it."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start, end = text.find(start_marker), text.find(end_marker)
    if 0 <= start < end:
        text = text[:start] + section + text[end + len(end_marker):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)
