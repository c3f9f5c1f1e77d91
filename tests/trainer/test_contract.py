"""What the operator imports from the trainer package: light modules, exit codes, the config contract."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO

from finetune_trainer import exit_codes
from finetune_trainer.config import TrainerConfig
from finetune_trainer.testing import tiny
from finetune_trainer.validation import problems


def test_operator_facing_modules_import_without_torch():
    code = ("import sys; import finetune_trainer.exit_codes, finetune_trainer.config; "
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'deepspeed') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": str(REPO / "trainer-image")})


EXIT_CODE_CASES = [
    (exit_codes.SUCCEEDED, False, "Succeeded"),
    (exit_codes.INVALID_CONFIG, False, "InvalidConfig"),
    (exit_codes.INVALID_DATA, False, "InvalidData"),
    (exit_codes.EVALUATION_GATE_FAILED, False, "EvaluationGateFailed"),
    (exit_codes.UNEXPECTED_ERROR, True, "UnexpectedError"),
    (exit_codes.RETRYABLE_ERROR, True, "RetryableError"),
    (exit_codes.PREEMPTED, True, "Preempted"),
]


@pytest.mark.parametrize("code,retryable,reason", EXIT_CODE_CASES)
def test_exit_codes(code, retryable, reason):
    assert exit_codes.is_retryable(code) is retryable
    assert exit_codes.reason(code) == reason


def test_exit_codes_are_distinct_and_classified():
    codes = [c for c, _, _ in EXIT_CODE_CASES]
    assert len(set(codes)) == len(codes)
    assert not exit_codes.PERMANENT & exit_codes.RETRYABLE


def test_unreadable_config_file_exits_invalid_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"apiVersion": "finetune.dev/trainer-config/v1", "kind": "TrainerConfig"}')
    done = subprocess.run([sys.executable, "-m", "finetune_trainer", "--config", str(path)], capture_output=True,
                          text=True, env={"PYTHONPATH": str(REPO / "trainer-image"), "PATH": "/usr/bin:/bin"})
    assert done.returncode == exit_codes.INVALID_CONFIG
    assert "invalid TrainerConfig" in done.stderr and "job" in done.stderr


def test_a_valid_config_has_no_cross_field_problems():
    config = TrainerConfig.model_validate({
        "job": {"namespace": "a", "name": "b"}, "model": {"uri": "s3://models/m/"},
        "datasets": [{"uri": "s3://data/d.jsonl"}], "output": {"uri": "s3://out/x/"},
        "distributed": {"engine": "deepspeed", "zeroStage": 3, "offload": "optimizer"}})
    assert problems(config) == []


def test_tiny_tokenizer_has_a_chat_template_and_round_trips():
    tokenizer = tiny.train_tokenizer()
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer("the operator restarts a pod.", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == "the operator restarts a pod."


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_models_load_back_from_their_folder(arch, tiny_model_dirs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[arch])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs[arch])
    assert model.config.model_type == arch and model.config.vocab_size == len(tokenizer)
    assert sum(p.numel() for p in model.parameters()) < 500_000
