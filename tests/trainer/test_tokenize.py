"""Tokenization as TRL's SFTTrainer/DPOTrainer does it: BOS by the tokenizer's own convention, the joint
prompt+completion tokenized once, the chat template for instruction and preference rows, and
preference truncation that cuts the prompt first.

Four tokenizers: ChatML (Qwen-like: no BOS added) and Llama-like (the post-processor prepends "<s>"
and the chat template renders it), each with and without a chat template.
"""

from __future__ import annotations

import json

import pytest

from finetune_trainer.data.formats import parse_line
from finetune_trainer.data.tokenize import PreferencePair, Sequence, encode, truncate
from finetune_trainer.testing import tiny

IM_PROMPT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


def row(fmt: str, **fields):
    return parse_line(json.dumps(fields), fmt, "test", 1)


def decode(tokenizer, ids) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False)


def trained(tokenizer, sequence: Sequence) -> str:
    return decode(tokenizer, [t for t, m in zip(sequence.input_ids, sequence.loss_mask) if m])


# Finding 6: BOS by the tokenizer's convention, exactly once and never trained; EOS once.
SEQUENCE_CASES = [
    # (tokenizer, format, row, whole sequence decoded, trained tokens decoded)
    ("chatml-plain", "text", {"text": "the operator restarts a pod."},
     "the operator restarts a pod.<|endoftext|>", "the operator restarts a pod.<|endoftext|>"),
    ("chatml-plain", "text", {"text": "the operator restarts a pod.<|endoftext|>"},
     "the operator restarts a pod.<|endoftext|>", "the operator restarts a pod.<|endoftext|>"),
    ("llama-plain", "text", {"text": "the operator restarts a pod."},
     "<s>the operator restarts a pod.<|endoftext|>", "the operator restarts a pod.<|endoftext|>"),
    ("llama-plain", "text", {"text": "<s>the operator restarts a pod."},
     "<s>the operator restarts a pod.<|endoftext|>", "the operator restarts a pod.<|endoftext|>"),
    ("llama-plain", "instruction", {"instruction": "Where?", "output": "In the bucket."},
     "<s>### Instruction:\nWhere?\n\n### Response:\nIn the bucket.<|endoftext|>", "In the bucket.<|endoftext|>"),
    ("llama", "instruction", {"instruction": "Where?", "output": "In the bucket."},
     "<s>" + IM_PROMPT.format("Where?") + "In the bucket.<|im_end|>\n", "In the bucket.<|im_end|>\n"),
    ("llama", "chat", {"messages": [{"role": "user", "content": "Where?"}, {"role": "assistant", "content": "Here."}]},
     "<s>" + IM_PROMPT.format("Where?") + "Here.<|im_end|>\n", "Here.<|im_end|>\n"),
]


@pytest.mark.parametrize("name,fmt,fields,full,target", SEQUENCE_CASES)
def test_bos_and_eos_follow_the_tokenizer(tokenizers, name, fmt, fields, full, target):
    tokenizer = tokenizers[name]
    sequence = encode(tokenizer, row(fmt, **fields))
    assert decode(tokenizer, sequence.input_ids) == full
    assert trained(tokenizer, sequence) == target


# Finding 6: prompt and completion tokenized once, jointly; the loss on every token that ends in the completion.
JOINT_CASES = [
    # (tokenizer, prompt, completion, trained tokens decoded)
    ("chatml-plain", "Q: where? A:", " in the bucket.", " in the bucket.<|endoftext|>"),
    ("chatml-plain", "the oper", "ator restarts.", " operator restarts.<|endoftext|>"),  # " operator" spans both
    ("chatml-plain", "hello ", "world", " world<|endoftext|>"),  # " w" spans both
    ("llama-plain", "the oper", "ator restarts.", " operator restarts.<|endoftext|>"),
    ("llama-plain", "", "the operator.", "the operator.<|endoftext|>"),  # the added BOS is never trained
]


@pytest.mark.parametrize("name,prompt,completion,target", JOINT_CASES)
def test_completion_is_the_joint_tokenization(tokenizers, name, prompt, completion, target):
    from finetune_trainer.data.formats import Example

    tokenizer = tokenizers[name]
    sequence = encode(tokenizer, Example(kind="completion", prompt=prompt, completion=completion))
    assert sequence.input_ids == tokenizer(prompt + completion)["input_ids"] + [tokenizer.eos_token_id]
    assert trained(tokenizer, sequence) == target


# Findings 6 and 11: preference prompts with BOS and the chat template; answers continue the prompt.
PREFERENCE_CASES = [
    # (tokenizer, prompt, chosen, prompt decoded, chosen decoded)
    ("chatml-plain", "Where?", " In the bucket.", "Where?", " In the bucket.<|endoftext|>"),
    ("llama-plain", "Where?", " In the bucket.", "<s>Where?", " In the bucket.<|endoftext|>"),
    ("chatml", "Where?", "In the bucket.", IM_PROMPT.format("Where?"), "In the bucket.<|im_end|>\n"),
    ("llama", "Where?", "In the bucket.", "<s>" + IM_PROMPT.format("Where?"), "In the bucket.<|im_end|>\n"),
    ("chatml-plain", "hello ", "world", "hello ", "world<|endoftext|>"),  # no joint prefix: nothing lost
]


@pytest.mark.parametrize("name,prompt,chosen,prompt_text,chosen_text", PREFERENCE_CASES)
def test_preference_prompt_and_answers(tokenizers, name, prompt, chosen, prompt_text, chosen_text):
    tokenizer = tokenizers[name]
    pair = encode(tokenizer, row("preference", prompt=prompt, chosen=chosen, rejected="No."))
    assert decode(tokenizer, pair.prompt_ids) == prompt_text
    assert decode(tokenizer, pair.chosen_ids) == chosen_text
    joint = tokenizer(prompt_text + chosen_text, add_special_tokens=False)["input_ids"]
    if joint[:len(pair.prompt_ids)] == pair.prompt_ids:  # like TRL: the answer is the joint string's rest
        assert pair.prompt_ids + pair.chosen_ids == joint


@pytest.mark.parametrize("name", ["chatml", "llama"])
def test_dpo_after_chat_sft_sees_the_same_format(tokenizers, name):
    tokenizer = tokenizers[name]
    sft = encode(tokenizer, row("instruction", instruction="Where?", output="In the bucket."))
    pair = encode(tokenizer, row("preference", prompt="Where?", chosen="In the bucket.", rejected="No."))
    assert pair.prompt_ids + pair.chosen_ids == sft.input_ids
    assert sft.loss_mask == [0] * len(pair.prompt_ids) + [1] * len(pair.chosen_ids)


# Finding 11: instruction rows use the chat template when there is one, the Alpaca template otherwise.
INSTRUCTION_CASES = [
    ("chatml", {"instruction": "Do X", "input": "case 1", "output": "Done."},
     IM_PROMPT.format("Do X\n\ncase 1") + "Done.<|im_end|>\n", "Done.<|im_end|>\n"),
    ("chatml", {"instruction": "Do X", "output": "Done."},
     IM_PROMPT.format("Do X") + "Done.<|im_end|>\n", "Done.<|im_end|>\n"),
    ("chatml-plain", {"instruction": "Do X", "input": "case 1", "output": "Done."},
     "### Instruction:\nDo X\n\n### Input:\ncase 1\n\n### Response:\nDone.<|endoftext|>", "Done.<|endoftext|>"),
]


@pytest.mark.parametrize("name,fields,full,target", INSTRUCTION_CASES)
def test_instruction_rows_use_the_chat_template(tokenizers, name, fields, full, target):
    tokenizer = tokenizers[name]
    sequence = encode(tokenizer, row("instruction", **fields))
    assert decode(tokenizer, sequence.input_ids) == full
    assert trained(tokenizer, sequence) == target


def test_instruction_strings_cover_every_field(tokenizers):
    example = row("instruction", instruction="Mail a@b.io", input="call 555", output="Done.")
    assert {"Mail a@b.io", "call 555", "Done."} <= set(example.strings())
    upper = example.map_strings(str.upper)
    assert {"MAIL A@B.IO", "CALL 555", "DONE."} <= set(upper.strings())
    assert "MAIL A@B.IO\n\nCALL 555" in decode(tokenizers["chatml"], encode(tokenizers["chatml"], upper).input_ids)


# Finding 10: the prompt is cut first (keeping its end), to what the answers leave but never under half.
TRUNCATION_CASES = [
    # (prompt, chosen, rejected lengths, max_length, expected lengths)
    ((3, 3, 3), 16, (3, 3, 3)),      # fits: unchanged
    ((4, 20, 10), 16, (4, 12, 10)),  # short prompt: the answers get the rest, not half
    ((2, 30, 30), 16, (2, 14, 14)),
    ((30, 3, 2), 8, (5, 3, 2)),      # long prompt, short answers: the prompt keeps what the answers leave
    ((20, 6, 1), 16, (10, 6, 1)),
    ((30, 30, 5), 16, (8, 8, 5)),    # both long: the prompt keeps half
    ((9, 9, 9), 16, (8, 8, 8)),
]


@pytest.mark.parametrize("lengths,max_length,expected", TRUNCATION_CASES)
def test_preference_truncation_cuts_the_prompt_first(lengths, max_length, expected):
    prompt, chosen, rejected = (list(range(base, base + n)) for base, n in zip((0, 100, 200), lengths))
    cut, was_cut = truncate(PreferencePair(prompt, chosen, rejected), max_length)
    assert (len(cut.prompt_ids), len(cut.chosen_ids), len(cut.rejected_ids)) == expected
    assert was_cut == (expected != lengths) and len(cut) <= max_length
    assert cut.prompt_ids == prompt[len(prompt) - expected[0]:]  # the prompt's end
    assert cut.chosen_ids == chosen[:expected[1]] and cut.rejected_ids == rejected[:expected[2]]


def test_sequence_truncation_cuts_the_end_without_adding_eos():
    assert truncate(Sequence([1, 2, 3, 9], [0, 1, 1, 1]), 3) == (Sequence([1, 2, 3], [0, 1, 1]), True)
