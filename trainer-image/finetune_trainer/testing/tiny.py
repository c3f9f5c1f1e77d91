"""Tiny random models and a tokenizer trained on the fly: for tests, benchmarks, the demo and e2e.

Nothing is downloaded. `save_tiny_model` writes a Hugging Face folder (config, safetensors,
tokenizer with a chat template); `upload_tiny_model` puts it under an S3 prefix; `sample_rows`
makes small datasets of each format whose patterns a tiny model learns within a few steps.
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

_SUBJECTS = ["the cluster", "a pod", "the operator", "the trainer", "a node", "the bucket", "a job", "the model"]
_VERBS = ["restarts", "schedules", "reads", "writes", "watches", "evicts", "checkpoints", "scales"]
_OBJECTS = ["the data", "a checkpoint", "the adapter", "every worker", "the metrics", "a secret", "the logs"]
_QUESTIONS = [
    ("What does the operator do?", "The operator watches jobs and creates the sandbox."),
    ("Where are checkpoints stored?", "Checkpoints are stored in the bucket under the run prefix."),
    ("How do I restart a job?", "Change the run id and apply the job again."),
    ("Which port serves metrics?", "Rank zero serves metrics on the metrics port."),
]


def corpus_sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}." for _ in range(n)]


def sample_rows(fmt: str, n: int, seed: int = 0) -> list[dict]:
    """n rows of one dataset format (text, instruction, chat, preference, feedback), deterministic per seed."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        question, answer = _QUESTIONS[rng.randrange(len(_QUESTIONS))]
        sentence = corpus_sentences(1, seed * 100_003 + i)[0]
        if fmt == "text":
            rows.append({"text": f"{sentence} {sentence.capitalize()} {i}"})
        elif fmt == "instruction":
            rows.append({"instruction": question, "input": f"case {i}", "output": answer})
        elif fmt == "chat":
            rows.append({"messages": [
                {"role": "system", "content": f"You answer briefly ({i})."},
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]})
        elif fmt == "preference":
            rows.append({"prompt": f"{question} ({i})", "chosen": answer, "rejected": sentence})
        elif fmt == "feedback":  # thumbs up on the right answer, down on an unrelated sentence, alternating
            rows.append({"prompt": f"{question} ({i})", "completion": answer if i % 2 == 0 else sentence,
                         "label": i % 2 == 0})
        else:
            raise ValueError(f"unknown format {fmt!r}")
    return rows


def _tokenizer_corpus() -> list[str]:
    texts = corpus_sentences(400)
    for question, answer in _QUESTIONS:
        texts += [question, answer]
    texts += [json.dumps(r) for fmt in ("chat", "instruction", "preference") for r in sample_rows(fmt, 20)]
    texts += ["system user assistant case You answer briefly", "0 1 2 3 4 5 6 7 8 9 ( ) . , ? : !"]
    return texts


def train_tokenizer(vocab_size: int = 600):
    """A byte-level BPE tokenizer with a ChatML chat template, wrapped as PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def train_bos_tokenizer(vocab_size: int = 600):
    """Like train_tokenizer, but Llama-like: a separate BOS "<s>" that the post-processor prepends
    (add_special_tokens=True) and that the chat template renders first. For tokenization tests only:
    its vocabulary has one token more than train_tokenizer's."""
    from tokenizers import processors

    tokenizer = train_tokenizer(vocab_size)
    tokenizer.add_special_tokens({"bos_token": "<s>"})
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.bos_token_id)])
    tokenizer.chat_template = "{{ bos_token }}" + CHAT_TEMPLATE
    return tokenizer


def build_model(tokenizer, arch: str = "llama", hidden_size: int = 64, layers: int = 2, seed: int = 0):
    """A randomly initialised causal LM: arch is llama or qwen2."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common))
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common))
    raise ValueError(f"unknown tiny architecture {arch!r} (llama, qwen2)")


def save_tiny_model(directory: str | Path, arch: str = "llama", **model_kwargs) -> Path:
    """Write a tiny model and its tokenizer into directory (Hugging Face format, safetensors)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    model = build_model(tokenizer, arch, **model_kwargs)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_lora_adapter(base_dir: str | Path, directory: str | Path, rank: int = 8, seed: int = 0,
                      scale: float = 0.05) -> Path:
    """A LoRA adapter (PEFT format) of the model in base_dir with small random weights (B scaled by `scale`, so
    the update is not zero): a stand-in for an adapter trained earlier, to continue from or to combine."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                        task_type="CAUSAL_LM")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(scale)
    model.save_pretrained(directory)
    return Path(directory)


def save_merged_model(base_dir: str | Path, adapter_dir: str | Path, directory: str | Path) -> Path:
    """The model in base_dir with the LoRA adapter in adapter_dir merged into its weights (a whole model, as a
    full fine-tune or output.merge writes one), with the base's tokenizer."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).merge_and_unload()
    merged.save_pretrained(directory)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(directory)
    return Path(directory)


def upload_tiny_model(storage, uri: str, arch: str = "llama", **model_kwargs) -> str:
    """Save a tiny model into a temporary folder and upload it under uri; storage is a finetune_trainer Storage."""
    with tempfile.TemporaryDirectory() as tmp:
        save_tiny_model(tmp, arch, **model_kwargs)
        storage.upload_dir(Path(tmp), uri)
    return uri


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def upload_rows(storage, uri: str, rows: list[dict]) -> str:
    storage.put_bytes(uri, jsonl(rows))
    return uri
