"""Examples to token ids, with a loss mask: 1 where the model is trained to predict the token.

As TRL's SFTTrainer and DPOTrainer:
- Plain strings are tokenized with the tokenizer's own special tokens (add_special_tokens=True: a BOS
  where the model family expects one, Llama yes, Qwen no; never a second one when the text already
  starts with it), and end with EOS (appended unless already last).
- A prompt and its completion are tokenized once, jointly, so the tokens at their boundary are the
  ones the model sees at inference; the loss covers every token whose characters end inside the
  completion (the offsets say which), plus the EOS.
- With a chat template, instruction rows become a [user, assistant] conversation and preference
  and feedback prompts a [user] turn with the generation prompt, so chat SFT, DPO and KTO train on
  one format. A
  rendered conversation is tokenized without added special tokens: the template writes its own BOS.
- For chat rows only the assistant turns are trained on. The assistant spans are found by rendering
  the tokenizer's own chat template on growing prefixes of the conversation, so any template whose
  rendering of a prefix is a prefix of the rendering of the whole works (every common one does).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

from ..errors import DataError
from .formats import Example, instruction_message, instruction_prompt


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


@dataclass
class FeedbackItem:
    """One feedback row (objective kto): the completion given the prompt, and whether it is desirable.
    kl_completion_ids: another row's completion, trained on with this prompt to estimate KTO's KL
    reference point (set per stage by the pipeline); reference: the reference model's log-probs of
    (completion, KL completion), set per stage."""

    prompt_ids: list[int]
    completion_ids: list[int]
    desirable: bool
    kl_completion_ids: list[int] = field(default_factory=list)
    reference: tuple[float, float] | None = None

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def _tokenize(tokenizer, text: str, special: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and character offsets; special: add the tokenizer's special tokens (BOS), at most one BOS."""
    encoded = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
    bos = tokenizer.bos_token_id
    if bos is not None and ids[:2] == [bos, bos] and offsets[0] == (0, 0):  # the text starts with BOS already
        ids, offsets = ids[:1] + ids[2:], offsets[:1] + offsets[2:]
    return ids, offsets


def _ending_in_eos(tokenizer, ids: list[int], mask: list[int]) -> Sequence:
    """The sequence with a trained EOS last (appended unless already there)."""
    eos = tokenizer.eos_token_id
    if eos is not None and ids and ids[-1] == eos:
        mask = mask[:-1] + [1]
    elif eos is not None:
        ids, mask = ids + [eos], mask + [1]
    return Sequence(ids, mask)


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_completion(tokenizer, prompt: str, completion: str) -> Sequence:
    """prompt + completion tokenized once; trained: the tokens ending after the prompt, and EOS (an
    added BOS has the offsets (0, 0), so it is never trained)."""
    ids, offsets = _tokenize(tokenizer, prompt + completion)
    return _ending_in_eos(tokenizer, ids, [int(end > len(prompt)) for _, end in offsets])


def encode_text(tokenizer, text: str) -> Sequence:
    """Every token trained but an added BOS."""
    return encode_completion(tokenizer, "", text)


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
    if not _has_chat_template(tokenizer):
        raise DataError("format chat needs a tokenizer with a chat template (tokenizer_config.json chat_template)")
    text, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(start <= token_start < end for start, end in spans)) for token_start, _ in encoded["offset_mapping"]]
    return Sequence(list(encoded["input_ids"]), mask)


def encode_instruction(tokenizer, instruction: str, context: str, output: str) -> Sequence:
    """The chat template's [user, assistant] conversation when there is one, else the Alpaca prompt."""
    if _has_chat_template(tokenizer):
        return encode_chat(tokenizer, (("user", instruction_message(instruction, context)), ("assistant", output)))
    return encode_completion(tokenizer, instruction_prompt(instruction, context), output)


def _prompt_and_answers(tokenizer, prompt: str, answers: list[str]) -> tuple[list[int], list[list[int]]]:
    """As TRL's DPOTrainer and KTOTrainer. With a chat template the prompt is the [user] turn with the
    generation prompt and each answer the rest of the rendered [user, assistant] conversation (its end
    of turn included, no EOS); without one the prompt is the raw string and each answer ends with EOS.
    An answer's ids are the joint prompt+answer tokenization after the prompt's ids; when the joint
    one does not start with them (a token across the boundary), the answer is tokenized alone, so
    that no character is lost or doubled (TRL would slice the joint ids anyway)."""
    if _has_chat_template(tokenizer):
        full = [_render(tokenizer, (("user", prompt), ("assistant", a))) for a in answers]
        # the prompt as rendered in every conversation (TRL: some templates render the generation prompt otherwise)
        prompt = os.path.commonprefix([_render(tokenizer, (("user", prompt),), add_generation_prompt=True), *full])
        answers, special = [f[len(prompt):] for f in full], False
    else:
        eos = tokenizer.eos_token or ""
        answers, special = [a if a.endswith(eos) else a + eos for a in answers], True
    prompt_ids, _ = _tokenize(tokenizer, prompt, special)

    def continuation(answer: str) -> list[int]:
        joint, _ = _tokenize(tokenizer, prompt + answer, special)
        if joint[: len(prompt_ids)] == prompt_ids:
            return joint[len(prompt_ids):]
        return _tokenize(tokenizer, answer, special=False)[0]

    return prompt_ids, [continuation(a) for a in answers]


def encode_preference(tokenizer, prompt: str, chosen: str, rejected: str) -> PreferencePair:
    prompt_ids, (chosen_ids, rejected_ids) = _prompt_and_answers(tokenizer, prompt, [chosen, rejected])
    return PreferencePair(prompt_ids, chosen_ids, rejected_ids)


def encode_feedback(tokenizer, prompt: str, completion: str, desirable: bool) -> FeedbackItem:
    """Prompt and completion split as a preference pair's prompt and answer are."""
    prompt_ids, (completion_ids,) = _prompt_and_answers(tokenizer, prompt, [completion])
    return FeedbackItem(prompt_ids, completion_ids, desirable)


def encode(tokenizer, example: Example) -> Sequence | PreferencePair:
    if example.kind == "text":
        return encode_text(tokenizer, example.text)
    if example.kind == "instruction":
        return encode_instruction(tokenizer, example.prompt, example.context, example.completion)
    if example.kind == "completion":
        return encode_completion(tokenizer, example.prompt, example.completion)
    if example.kind == "chat":
        return encode_chat(tokenizer, example.messages)
    if example.kind == "preference":
        return encode_preference(tokenizer, example.prompt, example.chosen, example.rejected)
    if example.kind == "feedback":
        return encode_feedback(tokenizer, example.prompt, example.completion, bool(example.label))
    raise ValueError(f"unknown example kind {example.kind!r}")


def _kept_prompt(prompt_ids: list[int], longest_answer: int, max_length: int) -> list[int]:
    """The end of a prompt, down to what the longest answer leaves but never below max_length // 2 tokens."""
    keep = max(max_length - longest_answer, max_length // 2, 1)
    return prompt_ids[-keep:]


def truncate(item, max_length: int) -> tuple[Sequence | PreferencePair | FeedbackItem, bool]:
    """Cut to max_length tokens; returns (item, was_cut).

    A sequence loses its end (no EOS is re-added, as in TRL). A preference pair or feedback row whose
    prompt plus longer answer is too long first loses the start of its prompt, down to what the longer
    answer leaves, but never below max_length // 2 tokens (so long answers cannot crowd the prompt out);
    then the answers are cut to what the prompt leaves. The result fits, and a non-empty prompt
    stays non-empty.
    """
    if len(item) <= max_length:
        return item, False
    if isinstance(item, Sequence):
        return Sequence(item.input_ids[:max_length], item.loss_mask[:max_length]), True
    if isinstance(item, FeedbackItem):
        prompt = _kept_prompt(item.prompt_ids, len(item.completion_ids), max_length)
        return replace(item, prompt_ids=prompt, completion_ids=item.completion_ids[:max_length - len(prompt)]), True
    prompt = _kept_prompt(item.prompt_ids, max(len(item.chosen_ids), len(item.rejected_ids)), max_length)
    budget = max_length - len(prompt)
    return PreferencePair(prompt, item.chosen_ids[:budget], item.rejected_ids[:budget], item.reference), True
