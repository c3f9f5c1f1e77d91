"""Run one optimizer step of the real training loop and save the gradient it applied (rank 0).

`python gradient_probe.py MODEL_DIR OUT.pt ENGINE BATCH ACCUMULATION [ZERO_STAGE]`, alone or under
torchrun: every rank builds the same LoRA model and the same rows of uneven lengths, trains one
step through finetune_trainer.train.run_loop, and the gradient is captured at the accumulation
boundary, after the ranks reduced it and before the optimizer used it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "trainer-image"))

from finetune_trainer import config as cfg  # noqa: E402
from finetune_trainer import distributed, engines, methods, objectives  # noqa: E402
from finetune_trainer.data.tokenize import Sequence  # noqa: E402
from finetune_trainer.train import run_loop  # noqa: E402

ROWS = 12


def rows(vocab: int) -> list[Sequence]:
    """Rows whose target counts differ by more than 10x (2 .. 38 targets), as in the review."""
    generator = torch.Generator().manual_seed(0)
    out = []
    for i in range(ROWS):
        length = [4, 40, 9, 25, 3, 31, 12, 6, 38, 17, 5, 22][i]
        ids = torch.randint(5, vocab, (length,), generator=generator).tolist()
        prompt = length // 3
        out.append(Sequence(ids, [0] * prompt + [1] * (length - prompt)))
    return out


def full_gradient(parameter) -> torch.Tensor:
    try:
        from deepspeed.utils import safe_get_full_grad

        grad = safe_get_full_grad(parameter)
    except ImportError:
        grad = None
    return (grad if grad is not None else parameter.grad).detach().float().cpu().clone()


def main(model_dir: str, out: str, engine_name: str, batch: int, accumulation: int, zero_stage: int | None) -> None:
    from transformers import AutoModelForCausalLM

    ctx = distributed.init(engine_name)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    method = cfg.Method(type="lora", lora=cfg.LoraSettings(rank=4, alpha=8, dropout=0.0))
    model = methods.get("lora").apply(model, method, ctx.device_type)
    torch.manual_seed(1)
    for name, parameter in model.named_parameters():  # LoRA B starts at zero: give every factor a gradient
        if parameter.requires_grad:
            parameter.data.normal_(0, 0.02)
    hp = cfg.Hyperparameters(batchSize=batch, gradientAccumulationSteps=accumulation, maxSteps=1, learningRate=1e-3,
                             warmupRatio=0.0, scheduler="constant", maxGradNorm=0.0)
    dist = cfg.Distributed(engine=engine_name, zeroStage=zero_stage)
    engine = engines.create(model, hp, 1, ctx, dist)
    captured = {}
    original = engine.after_backward

    def capture(boundary: bool) -> None:
        if boundary:
            with engine.full_parameters():
                captured.update({n: full_gradient(p) for n, p in engine.module.named_parameters() if p.requires_grad})
        original(boundary)

    engine.after_backward = capture
    items = rows(model.config.vocab_size)
    run_loop(engine, objectives.get("sft"), items, hp, ctx, 0, 0, 1, 0, lambda: False, lambda report: None)
    if ctx.is_main:
        torch.save(captured, out)
    # Every rank done before any tears the group down: a rank that destroyed it while its peer still
    # held the connection was once aborted by gloo ("terminate called without an active exception").
    distributed.barrier()
    distributed.destroy()


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[0], args[1], args[2], int(args[3]), int(args[4]), int(args[5]) if len(args) > 5 else None)
