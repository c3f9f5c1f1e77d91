"""Evaluation prompts and greedy generation (finetune_trainer.generation).

The prompt of an evaluation row is what the model saw before the answer it was trained on, token for token;
generation is greedy, batched without changing any answer, bounded, stops at EOS or the chat template's end of
turn, returns only the new text, and under torchrun gives every rank the answers one process gives.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from finetune_trainer.data.formats import parse_line
from finetune_trainer.data.tokenize import encode
from finetune_trainer.distributed import DistContext
from finetune_trainer.errors import ConfigError, DataError
from finetune_trainer.generation import (
    EvalPrompt,
    end_of_turn_id,
    eval_prompt,
    generate,
    generate_ids,
    load_prompts,
    prompt_ids,
    stop_ids,
)
from finetune_trainer.testing import tiny

SINGLE = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
IM_PROMPT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


def row(fmt: str, fields: dict):
    return parse_line(json.dumps(fields), fmt, "test", 1)


def untrained_start(sequence) -> list[int]:
    """The ids before the sequence's last run of trained tokens (the last answer)."""
    end = len(sequence.loss_mask)
    while end and sequence.loss_mask[end - 1]:
        end -= 1
    return sequence.input_ids[:end]


INSTRUCTION = {"instruction": "Where are checkpoints stored?", "input": "case 1", "output": "In the bucket."}
INSTRUCTION_NO_INPUT = {"instruction": "Where?", "output": "In the bucket."}
CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where?"},
                     {"role": "assistant", "content": "Here."}]}
CHAT_MULTI_TURN = {"messages": [{"role": "user", "content": "Where?"}, {"role": "assistant", "content": "Here."},
                                {"role": "user", "content": "And then?"}, {"role": "assistant", "content": "There."},
                                {"role": "user", "content": "A turn after the last answer is not part of it."}]}
ALPACA = "### Instruction:\nWhere are checkpoints stored?\n\n### Input:\ncase 1\n\n### Response:\n"

PROMPT_CASES = [
    # (id, tokenizer, format, row, prompt text, reference)
    ("instruction-chatml", "chatml", "instruction", INSTRUCTION,
     IM_PROMPT.format("Where are checkpoints stored?\n\ncase 1"), "In the bucket."),
    ("instruction-llama", "llama", "instruction", INSTRUCTION,
     "<s>" + IM_PROMPT.format("Where are checkpoints stored?\n\ncase 1"), "In the bucket."),
    ("instruction-alpaca", "chatml-plain", "instruction", INSTRUCTION, ALPACA, "In the bucket."),
    ("instruction-alpaca-bos", "llama-plain", "instruction", INSTRUCTION, ALPACA, "In the bucket."),
    ("instruction-alpaca-no-input", "chatml-plain", "instruction", INSTRUCTION_NO_INPUT,
     "### Instruction:\nWhere?\n\n### Response:\n", "In the bucket."),
    ("chat-system", "chatml", "chat", CHAT,
     "<|im_start|>system\nBe brief.<|im_end|>\n" + IM_PROMPT.format("Where?"), "Here."),
    ("chat-llama", "llama", "chat", CHAT,
     "<s><|im_start|>system\nBe brief.<|im_end|>\n" + IM_PROMPT.format("Where?"), "Here."),
    ("chat-multi-turn", "chatml", "chat", CHAT_MULTI_TURN,
     IM_PROMPT.format("Where?") + "Here.<|im_end|>\n" + IM_PROMPT.format("And then?"), "There."),
]


@pytest.mark.parametrize("name,fmt,fields,text,reference", [c[1:] for c in PROMPT_CASES],
                         ids=[c[0] for c in PROMPT_CASES])
def test_prompt_is_what_training_put_before_the_answer(tokenizers, name, fmt, fields, text, reference):
    tokenizer = tokenizers[name]
    example = row(fmt, fields)
    prompt = eval_prompt(tokenizer, example)
    assert prompt == EvalPrompt(prompt_text=text, reference=reference)
    # the ids generation starts from are exactly the untrained ids before the answer in the training sequence
    trained_on = fields if fmt == "instruction" else {"messages": fields["messages"][:4]}
    assert prompt_ids(tokenizer, prompt.prompt_text) == untrained_start(encode(tokenizer, row(fmt, trained_on)))


def test_chat_rows_need_a_chat_template(tokenizers):
    with pytest.raises(DataError, match="chat template"):
        eval_prompt(tokenizers["chatml-plain"], row("chat", CHAT))


END_OF_TURN_CASES = [
    # (tokenizer, end of turn token or None, stop tokens of a model whose generation config says EOS only)
    ("chatml", "<|im_end|>", ["<|endoftext|>", "<|im_end|>"]),
    ("llama", "<|im_end|>", ["<|endoftext|>", "<|im_end|>"]),
    ("chatml-plain", None, ["<|endoftext|>"]),
]


@pytest.mark.parametrize("name,end_of_turn,stops", END_OF_TURN_CASES, ids=[c[0] for c in END_OF_TURN_CASES])
def test_generation_stops_at_eos_and_at_the_end_of_a_chat_turn(tokenizers, name, end_of_turn, stops):
    tokenizer = tokenizers[name]
    model = tiny.build_model(tokenizers["chatml"])  # its generation config: EOS <|endoftext|> only
    found = end_of_turn_id(tokenizer)
    assert (None if found is None else tokenizer.convert_ids_to_tokens(found)) == end_of_turn
    assert tokenizer.convert_ids_to_tokens(stop_ids(model, tokenizer)) == stops


# --- load_prompts: JSON Lines in S3 -----------------------------------------------------------------------------


def put_lines(storage, uri: str, lines: list[str]) -> str:
    storage.put_bytes(uri, "".join(line + "\n" for line in lines).encode())
    return uri


def test_load_prompts_reads_rows_and_draws_a_seeded_sample(storage, bucket, tokenizers):
    rows = tiny.sample_rows("instruction", 10, seed=2)
    uri = tiny.upload_rows(storage, f"{bucket}tasks/support.jsonl", rows)
    tokenizer = tokenizers["chatml"]

    everything = load_prompts(storage, uri, "instruction", None, 0, tokenizer=tokenizer)
    assert everything == [eval_prompt(tokenizer, row("instruction", r)) for r in rows]
    assert load_prompts(storage, uri, "instruction", 50, 0, tokenizer=tokenizer) == everything

    drawn = load_prompts(storage, uri, "instruction", 4, 7, tokenizer=tokenizer)
    assert len(drawn) == 4
    assert drawn == load_prompts(storage, uri, "instruction", 4, 7, tokenizer=tokenizer)
    positions = [everything.index(p) for p in drawn]
    assert positions == sorted(positions)  # in file order


def test_load_prompts_reads_every_file_under_a_prefix(storage, bucket, tokenizers):
    tiny.upload_rows(storage, f"{bucket}tasks/chat/a.jsonl", tiny.sample_rows("chat", 2, seed=1))
    tiny.upload_rows(storage, f"{bucket}tasks/chat/b.jsonl", tiny.sample_rows("chat", 3, seed=2))
    prompts = load_prompts(storage, f"{bucket}tasks/chat/", "chat", None, 0, tokenizer=tokenizers["chatml"])
    assert len(prompts) == 5
    assert {p.reference for p in prompts} <= {answer for _, answer in tiny._QUESTIONS}


BAD_ROW_CASES = [
    # (id, format, third line, error)
    ("not-json", "instruction", '{"instruction": "Where?", ', r"tasks/bad\.jsonl:3: not valid JSON"),
    ("not-an-object", "instruction", '["Where?"]', r"tasks/bad\.jsonl:3: a row must be a JSON object"),
    ("no-output", "instruction", '{"instruction": "Where?"}', r"tasks/bad\.jsonl:3: bad instruction row: .*'output'"),
    ("no-assistant", "chat", '{"messages": [{"role": "user", "content": "Where?"}]}',
     r"tasks/bad\.jsonl:3: bad chat row: .*assistant"),
]


@pytest.mark.parametrize("fmt,line,error", [c[1:] for c in BAD_ROW_CASES], ids=[c[0] for c in BAD_ROW_CASES])
def test_a_bad_row_is_a_data_error_naming_file_and_line(storage, bucket, tokenizers, fmt, line, error):
    good = [json.dumps(r) for r in tiny.sample_rows(fmt, 2)]
    uri = put_lines(storage, f"{bucket}tasks/bad.jsonl", [*good, line, *good])
    with pytest.raises(DataError, match=error):
        load_prompts(storage, uri, fmt, 1, 0, tokenizer=tokenizers["chatml"])


def test_an_empty_task_is_a_data_error(storage, bucket, tokenizers):
    uri = put_lines(storage, f"{bucket}tasks/empty.jsonl", [""])
    with pytest.raises(DataError, match="no evaluation rows"):
        load_prompts(storage, uri, "instruction", None, 0, tokenizer=tokenizers["chatml"])


@pytest.mark.parametrize("fmt", ["text", "preference", "feedback"])
def test_only_instruction_and_chat_rows_are_prompts(storage, bucket, tokenizers, fmt):
    uri = tiny.upload_rows(storage, f"{bucket}tasks/{fmt}.jsonl", tiny.sample_rows(fmt, 2))
    with pytest.raises(ConfigError, match="instruction or chat"):
        load_prompts(storage, uri, fmt, None, 0, tokenizer=tokenizers["chatml"])


# --- generation on a tiny model ---------------------------------------------------------------------------------

ARCHES = ["llama", "qwen2"]


@pytest.fixture(scope="module")
def tokenizer(tokenizers):
    return tokenizers["chatml"]


@pytest.fixture
def model(request, tokenizer):
    return tiny.build_model(tokenizer, request.param)


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[str]:
    """Prompts of different lengths, so that batches are left-padded."""
    rows = [row("instruction", r) for r in tiny.sample_rows("instruction", 3, seed=4)]
    rows += [row("chat", r) for r in tiny.sample_rows("chat", 3, seed=6)]
    rows.append(row("instruction", {"instruction": " ".join(tiny.corpus_sentences(5)), "output": "x"}))
    return [eval_prompt(tokenizer, example).prompt_text for example in rows]


def greedy_by_hand(model, ids: list[int], max_new_tokens: int, stops: list[int]) -> list[int]:
    """Greedy decoding with a full forward pass per token: the reference the batched generation must match."""
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if token in stops:
                break
            new.append(token)
    return new


@pytest.mark.parametrize("model", ARCHES, indirect=True)
def test_answers_are_the_greedy_continuation_of_the_prompt_only(model, tokenizer, prompts):
    answers = generate_ids(model, tokenizer, prompts, 10, 4, SINGLE)
    stops = stop_ids(model, tokenizer)
    model.eval()
    assert answers == [greedy_by_hand(model, prompt_ids(tokenizer, p), 10, stops) for p in prompts]
    texts = generate(model, tokenizer, prompts, 10, 4, SINGLE)
    assert texts == [tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers]


@pytest.mark.parametrize("model", ARCHES, indirect=True)
@pytest.mark.parametrize("batch_size", [2, 3, 16])
def test_batched_answers_equal_one_by_one_and_repeat(model, tokenizer, prompts, batch_size):
    one_by_one = generate_ids(model, tokenizer, prompts, 10, 1, SINGLE)
    assert generate_ids(model, tokenizer, prompts, 10, batch_size, SINGLE) == one_by_one
    assert generate_ids(model, tokenizer, prompts, 10, batch_size, SINGLE) == one_by_one


@pytest.mark.parametrize("model", ["llama"], indirect=True)
@pytest.mark.parametrize("max_new_tokens", [1, 4, 9])
def test_answers_are_bounded_by_max_new_tokens(model, tokenizer, prompts, max_new_tokens):
    longer = generate_ids(model, tokenizer, prompts, 12, 4, SINGLE)
    bounded = generate_ids(model, tokenizer, prompts, max_new_tokens, 4, SINGLE)
    assert all(len(answer) <= max_new_tokens for answer in bounded)
    assert bounded == [answer[:max_new_tokens] for answer in longer]


@pytest.mark.parametrize("model", ["llama"], indirect=True)
def test_generation_stops_at_a_stop_token_and_leaves_it_out(model, tokenizer, prompts):
    free = generate_ids(model, tokenizer, prompts[:1], 8, 1, SINGLE)[0]
    stop = free[3]
    model.generation_config.eos_token_id = stop  # as models that end answers with their own token declare it
    stopped = generate_ids(model, tokenizer, prompts[:1], 8, 1, SINGLE)[0]
    assert stopped == free[:free.index(stop)]


@pytest.mark.parametrize("model", ["llama"], indirect=True)
def test_a_long_prompt_loses_its_start_to_fit_the_model(model, tokenizer):
    model.config.max_position_embeddings = 40
    long_prompt = " ".join(tiny.corpus_sentences(20))
    ids = prompt_ids(tokenizer, long_prompt)
    assert len(ids) > 40
    answer = generate_ids(model, tokenizer, [long_prompt, "a pod"], 8, 2, SINGLE)[0]
    model.eval()
    assert answer == greedy_by_hand(model, ids[-32:], 8, stop_ids(model, tokenizer))
    with pytest.raises(ConfigError, match="no room for a prompt"):
        generate_ids(model, tokenizer, [long_prompt], 40, 1, SINGLE)


@pytest.mark.parametrize("model", ["llama"], indirect=True)
@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
def test_the_model_mode_is_restored(model, tokenizer, prompts, training):
    model.train(training)
    generate(model, tokenizer, prompts[:2], 2, 2, SINGLE)
    assert model.training is training
    assert all(module.training is training for module in model.modules())


@pytest.mark.parametrize("model", ["llama"], indirect=True)
def test_no_prompts_no_answers(model, tokenizer):
    assert generate(model, tokenizer, [], 4, 2, SINGLE) == []


# --- torchrun ---------------------------------------------------------------------------------------------------

PROBE = REPO / "tests" / "trainer" / "generation_probe.py"


def run_probe(model_dir, out_dir, nproc: int, batch_size: int) -> list[list[str]]:
    """The answers every rank of the probe got."""
    out_dir.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{REPO / 'trainer-image'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else []
    done = subprocess.run([sys.executable, *launcher, str(PROBE), str(model_dir), str(out_dir), str(batch_size)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=out_dir)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((out_dir / f"answers-{rank}.json").read_text()) for rank in range(nproc)]


@pytest.mark.slow
def test_two_processes_give_every_rank_the_answers_of_one(tiny_model_dirs, tmp_path):
    (alone,) = run_probe(tiny_model_dirs["llama"], tmp_path / "one", nproc=1, batch_size=1)
    ranks = run_probe(tiny_model_dirs["llama"], tmp_path / "two", nproc=2, batch_size=2)
    assert len(alone) == 7
    assert ranks == [alone, alone]
