"""Answers of a model to held-out prompts, for evaluation tasks.

The prompts are the text the model was trained on before its answer (data/tokenize.py renders it the same
way), and are tokenized as training tokenizes them. Generation is greedy, batched with left padding, bounded
(prompt cut from the left to leave room for max_new_tokens) and shared out over the ranks: each rank answers
its shard and every rank gets every answer, in the order of the prompts.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from jinja2 import TemplateError

from .data.formats import Example, instruction_message, instruction_prompt
from .data.pipeline import SourceReport, read_examples
from .data.tokenize import _has_chat_template, _tokenize, assistant_spans
from .distributed import DistContext, shard
from .errors import ConfigError, DataError
from .evaluation import sample

EVAL_FORMATS = ("instruction", "chat")

# A conversation rendered to find the token that ends an assistant turn (ChatML <|im_end|>, Llama 3 <|eot_id|>).
_PROBE_ANSWER = "Hi"
_PROBE_CONVERSATION = (("user", "Hello"), ("assistant", _PROBE_ANSWER))


@dataclass(frozen=True)
class EvalPrompt:
    prompt_text: str
    reference: str


def _prompt_before_last_answer(tokenizer, messages: tuple[tuple[str, str], ...]) -> str:
    """The rendered conversation up to the last assistant turn, generation prompt included: the characters
    that precede that turn's trained span in training."""
    last = max(i for i, (role, _) in enumerate(messages) if role == "assistant")
    text, spans = assistant_spans(tokenizer, messages[: last + 1])
    return text[: spans[-1][0]]


def eval_prompt(tokenizer, example: Example) -> EvalPrompt:
    """The prompt and reference answer of an instruction or chat row, as encode() frames them for training."""
    if example.kind == "instruction":
        if _has_chat_template(tokenizer):
            conversation = (("user", instruction_message(example.prompt, example.context)),
                            ("assistant", example.completion))
            return EvalPrompt(_prompt_before_last_answer(tokenizer, conversation), example.completion)
        return EvalPrompt(instruction_prompt(example.prompt, example.context), example.completion)
    if example.kind == "chat":
        if not _has_chat_template(tokenizer):
            raise DataError("evaluation prompts of format chat need a tokenizer with a chat template")
        reference = next(content for role, content in reversed(example.messages) if role == "assistant")
        return EvalPrompt(_prompt_before_last_answer(tokenizer, example.messages), reference)
    raise ConfigError(f"evaluation prompts are rows of format {' or '.join(EVAL_FORMATS)}, not {example.kind!r}")


def load_prompts(storage, uri: str, fmt: str, max_samples: int | None, seed: int, *, tokenizer) -> list[EvalPrompt]:
    """The prompts of a JSON Lines object (or of the .jsonl objects under a prefix): every row is parsed (a bad
    one is a DataError naming its file and line), then at most max_samples rows are drawn with seed, in file order."""
    if fmt not in EVAL_FORMATS:
        raise ConfigError(f"evaluation prompts are rows of format {' or '.join(EVAL_FORMATS)}, not {fmt!r}")
    examples = list(read_examples(storage, uri, fmt, SourceReport(uri=uri, format=fmt, weight=1.0)))
    if not examples:
        raise DataError(f"{uri}: no evaluation rows")
    if max_samples is not None:
        examples = sample(examples, max_samples, seed)
    return [eval_prompt(tokenizer, example) for example in examples]


def prompt_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt, as training tokenizes it: text rendered by a chat template carries its own special
    tokens; a plain prompt gets the tokenizer's (a BOS where the family has one, never two)."""
    ids, _ = _tokenize(tokenizer, text, special=not _has_chat_template(tokenizer))
    return ids


def end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template closes an assistant turn with; chat-trained models end their answer
    with it rather than with EOS. None without a template or when the template closes turns otherwise."""
    if not _has_chat_template(tokenizer):
        return None
    try:
        text, spans = assistant_spans(tokenizer, _PROBE_CONVERSATION)
    except (TemplateError, DataError, ValueError):
        return None
    start, end = spans[-1]
    turn = text[start:end]
    if not turn.startswith(_PROBE_ANSWER):
        return None
    special = set(tokenizer.all_special_ids)
    closing = tokenizer(turn[len(_PROBE_ANSWER):], add_special_tokens=False)["input_ids"]
    return next((token for token in closing if token in special), None)


def stop_ids(model, tokenizer) -> list[int]:
    """EOS as the model's generation config and the tokenizer declare it, and the chat template's end of turn."""
    declared = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    candidates = list(declared) if isinstance(declared, (list, tuple)) else [declared]
    candidates += [tokenizer.eos_token_id, end_of_turn_id(tokenizer)]
    return list(dict.fromkeys(token for token in candidates if token is not None))


def _generating_model(model):
    """The model under a DDP or DeepSpeed wrapper (they do not generate)."""
    while not hasattr(model, "generate") and hasattr(model, "module"):
        model = model.module
    return model


def _prompt_budget(model, max_new_tokens: int) -> int | None:
    """Tokens a prompt may keep so that it and max_new_tokens fit the model's positions (None: no known limit)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if positions is None:
        return None
    if positions - max_new_tokens < 1:
        raise ConfigError(f"{max_new_tokens} new tokens leave no room for a prompt in the model's {positions} positions")
    return positions - max_new_tokens


def _left_padded(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = [[pad_id] * (width - len(row)) + row for row in rows]
    mask = [[0] * (width - len(row)) + [1] * len(row) for row in rows]
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)


def _until_stop(tokens: list[int], stops: set[int]) -> list[int]:
    """The answer's tokens before the first stop token (after it come the padding of a finished row)."""
    for position, token in enumerate(tokens):
        if token in stops:
            return tokens[:position]
    return tokens


def _gathered(answers: dict[int, list[int]], n: int) -> list[list[int]]:
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts: list[dict[int, list[int]] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, answers)
        answers = {index: tokens for part in parts for index, tokens in part.items()}
    return [answers[i] for i in range(n)]


def generate_ids(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int, ctx: DistContext,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> list[list[int]]:
    """The new token ids of the greedy answer to each prompt, without the stop token; every rank returns all of
    them. Collective under several ranks: every rank must call it with the same prompts."""
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError("max_new_tokens and batch_size must be at least 1")
    n = len(prompts)
    model = _generating_model(model)
    budget = _prompt_budget(model, max_new_tokens)
    # Every rank runs as many batches (ZeRO-3 needs the same number of forward passes): indices >= n are padding.
    owned = shard(n, ctx.rank, ctx.world_size)
    encoded = {i % n: prompt_ids(tokenizer, prompts[i % n]) for i in owned}
    if budget is not None:
        encoded = {i: ids[-budget:] for i, ids in encoded.items()}
    owned.sort(key=lambda i: -len(encoded[i % n]))  # batches of similar lengths pad less
    stops = stop_ids(model, tokenizer)
    # ZeRO-3 gathers each layer's weights from every rank at every forward pass: a rank whose rows are all done
    # keeps stepping until every rank is (transformers does this only when it set up DeepSpeed itself).
    synced = (dist.is_initialized() and dist.get_world_size() > 1
              and any(hasattr(parameter, "ds_id") for parameter in model.parameters()))
    pad_id = next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)
    answers: dict[int, list[int]] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(owned), batch_size):
                chunk = owned[start:start + batch_size]
                input_ids, attention_mask = _left_padded([encoded[i % n] for i in chunk], pad_id, ctx.device)
                with autocast():
                    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                            num_beams=1, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                                            eos_token_id=stops or None, use_cache=True, synced_gpus=synced)
                for i, tokens in zip(chunk, output[:, input_ids.shape[1]:].tolist()):
                    if i < n:
                        answers[i] = _until_stop(tokens, set(stops))
    finally:
        model.train(was_training)
    return _gathered(answers, n)


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int, ctx: DistContext,
             autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> list[str]:
    """The greedy answer to each prompt: the new text only, special tokens skipped, stripped. Every rank returns
    every answer, in the order of the prompts."""
    answers = generate_ids(model, tokenizer, prompts, max_new_tokens, batch_size, ctx, autocast)
    return [tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens in answers]
