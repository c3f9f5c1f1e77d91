"""Dataset row formats: parse one JSON line into an Example, or say exactly what is wrong with it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Callable

from ..errors import DataError

CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Example:
    """One row, kept as written: how it is rendered (chat template or not) is decided in tokenize.encode,
    where the tokenizer is known. kind: text | instruction (prompt: the instruction, context: the
    optional input, completion: the output) | completion (prompt + completion) | chat | preference |
    feedback (prompt + completion, label: True desirable / False undesirable)."""

    kind: str
    text: str = ""
    prompt: str = ""
    context: str = ""
    completion: str = ""
    messages: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    chosen: str = ""
    rejected: str = ""
    label: bool | None = None

    def strings(self) -> list[str]:
        """Every string of the row (PII redaction, de-duplication and the leak check read these)."""
        return [self.text, self.prompt, self.context, self.completion, *(c for _, c in self.messages), self.chosen,
                self.rejected]

    def map_strings(self, fn: Callable[[str], str]) -> "Example":
        return replace(
            self,
            text=fn(self.text),
            prompt=fn(self.prompt),
            context=fn(self.context),
            completion=fn(self.completion),
            messages=tuple((role, fn(content)) for role, content in self.messages),
            chosen=fn(self.chosen),
            rejected=fn(self.rejected),
        )


def instruction_prompt(instruction: str, context: str) -> str:
    """The Alpaca prompt, for tokenizers without a chat template."""
    prompt = f"### Instruction:\n{instruction}\n"
    if context:
        prompt += f"\n### Input:\n{context}\n"
    return prompt + "\n### Response:\n"


def instruction_message(instruction: str, context: str) -> str:
    """The user turn of an instruction row, for tokenizers with a chat template."""
    return f"{instruction}\n\n{context}" if context else instruction


def _string(row: dict, key: str, required: bool = True) -> str:
    value = row.get(key, None)
    if value is None:
        if required:
            raise ValueError(f"missing field {key!r}")
        return ""
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def _parse_text(row: dict) -> Example:
    text = _string(row, "text")
    if not text.strip():
        raise ValueError("field 'text' is empty")
    return Example(kind="text", text=text)


def _parse_instruction(row: dict) -> Example:
    instruction = _string(row, "instruction")
    output = _string(row, "output")
    if not output.strip():
        raise ValueError("field 'output' is empty")
    return Example(kind="instruction", prompt=instruction, context=_string(row, "input", required=False),
                   completion=output)


def _parse_chat(row: dict) -> Example:
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("field 'messages' must be a non-empty list")
    parsed = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be an object")
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string")
        parsed.append((role, content))
    if not any(role == "assistant" for role, _ in parsed):
        raise ValueError("a chat row needs at least one assistant message")
    return Example(kind="chat", messages=tuple(parsed))


def _parse_preference(row: dict) -> Example:
    example = Example(kind="preference", prompt=_string(row, "prompt"), chosen=_string(row, "chosen"),
                      rejected=_string(row, "rejected"))
    if not example.chosen.strip() or not example.rejected.strip():
        raise ValueError("fields 'chosen' and 'rejected' must not be empty")
    return example


def _parse_feedback(row: dict) -> Example:
    label = row.get("label", None)
    if label is None:
        raise ValueError("missing field 'label'")
    if not isinstance(label, bool):
        raise ValueError(f"field 'label' must be true (desirable) or false (undesirable), got {label!r}")
    example = Example(kind="feedback", prompt=_string(row, "prompt"), completion=_string(row, "completion"), label=label)
    if not example.completion.strip():
        raise ValueError("field 'completion' is empty")
    return example


PARSERS: dict[str, Callable[[dict], Example]] = {
    "text": _parse_text,
    "instruction": _parse_instruction,
    "chat": _parse_chat,
    "preference": _parse_preference,
    "feedback": _parse_feedback,
}


def parse_line(line: bytes | str, fmt: str, source: str, line_number: int) -> Example:
    """Parse one JSON line; any problem is a DataError naming the file and line."""
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{source}:{line_number}: not valid JSON ({e})") from None
    if not isinstance(row, dict):
        raise DataError(f"{source}:{line_number}: a row must be a JSON object")
    try:
        return PARSERS[fmt](row)
    except ValueError as e:
        raise DataError(f"{source}:{line_number}: bad {fmt} row: {e}") from None
