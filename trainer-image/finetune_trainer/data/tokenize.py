"""Examples to token ids, with a loss mask: 1 where the model is trained to predict the token.

For chat rows only the assistant turns are trained on. The assistant spans are found by rendering
the tokenizer's own chat template on growing prefixes of the conversation, so any template whose
rendering of a prefix is a prefix of the rendering of the whole works (every common one does).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import DataError
from .formats import Example


@dataclass
class Sequence:
    input_ids: list[int]
    loss_mask: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class PreferencePair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    reference: tuple[float, float] | None = None  # the reference model's log-probs (dpo), set per stage

    def __len__(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _eos(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def encode_text(tokenizer, text: str) -> Sequence:
    ids = _ids(tokenizer, text) + _eos(tokenizer)
    return Sequence(ids, [1] * len(ids))


def encode_completion(tokenizer, prompt: str, completion: str) -> Sequence:
    prompt_ids = _ids(tokenizer, prompt)
    completion_ids = _ids(tokenizer, completion) + _eos(tokenizer)
    return Sequence(prompt_ids + completion_ids, [0] * len(prompt_ids) + [1] * len(completion_ids))


def _render(tokenizer, messages, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        [{"role": r, "content": c} for r, c in messages], tokenize=False, add_generation_prompt=add_generation_prompt
    )


def assistant_spans(tokenizer, messages: tuple[tuple[str, str], ...]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of the assistant turns in it."""
    full = _render(tokenizer, messages)
    spans = []
    for i, (role, _) in enumerate(messages):
        if role != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], add_generation_prompt=True))
        end = len(_render(tokenizer, messages[: i + 1]))
        if not full.startswith(_render(tokenizer, messages[: i + 1])):
            raise DataError("the tokenizer's chat template does not render prefixes of a conversation as prefixes")
        spans.append((start, end))
    return full, spans


def encode_chat(tokenizer, messages: tuple[tuple[str, str], ...]) -> Sequence:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("format chat needs a tokenizer with a chat template (tokenizer_config.json chat_template)")
    text, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(start <= token_start < end for start, end in spans)) for token_start, _ in encoded["offset_mapping"]]
    return Sequence(list(encoded["input_ids"]), mask)


def encode_preference(tokenizer, prompt: str, chosen: str, rejected: str) -> PreferencePair:
    return PreferencePair(_ids(tokenizer, prompt), _ids(tokenizer, chosen) + _eos(tokenizer),
                          _ids(tokenizer, rejected) + _eos(tokenizer))


def encode(tokenizer, example: Example) -> Sequence | PreferencePair:
    if example.kind == "text":
        return encode_text(tokenizer, example.text)
    if example.kind == "completion":
        return encode_completion(tokenizer, example.prompt, example.completion)
    if example.kind == "chat":
        return encode_chat(tokenizer, example.messages)
    if example.kind == "preference":
        return encode_preference(tokenizer, example.prompt, example.chosen, example.rejected)
    raise ValueError(f"unknown example kind {example.kind!r}")


def truncate(item: Sequence | PreferencePair, max_length: int) -> tuple[Sequence | PreferencePair, bool]:
    """Cut to max_length tokens (a preference pair keeps its prompt's end); returns (item, was_cut)."""
    if len(item) <= max_length:
        return item, False
    if isinstance(item, Sequence):
        return Sequence(item.input_ids[:max_length], item.loss_mask[:max_length]), True
    answer_budget = max(1, max_length // 2)
    chosen, rejected = item.chosen_ids[:answer_budget], item.rejected_ids[:answer_budget]
    prompt_budget = max_length - max(len(chosen), len(rejected))
    prompt = item.prompt_ids[-prompt_budget:] if prompt_budget > 0 else []
    return PreferencePair(prompt, chosen, rejected), True
