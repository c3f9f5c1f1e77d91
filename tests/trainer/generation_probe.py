"""Answer a fixed set of evaluation prompts with finetune_trainer.generation and save what this rank got.

`python generation_probe.py MODEL_DIR OUT_DIR BATCH_SIZE`, alone or under torchrun: every rank writes
OUT_DIR/answers-<rank>.json, the answers to all PROMPTS (an odd number, so that one rank's shard is padded).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "trainer-image"))

from finetune_trainer import distributed  # noqa: E402
from finetune_trainer.data.formats import parse_line  # noqa: E402
from finetune_trainer.generation import eval_prompt, generate  # noqa: E402
from finetune_trainer.testing import tiny  # noqa: E402

MAX_NEW_TOKENS = 12


def prompts(tokenizer) -> list[str]:
    rows = [("instruction", r) for r in tiny.sample_rows("instruction", 4, seed=3)]
    rows += [("chat", r) for r in tiny.sample_rows("chat", 3, seed=5)]
    rows[1][1]["input"] = " ".join(tiny.corpus_sentences(6, seed=1))  # a longer prompt, so batches need padding
    return [eval_prompt(tokenizer, parse_line(json.dumps(row), fmt, "probe", i)).prompt_text
            for i, (fmt, row) in enumerate(rows, start=1)]


def main(model_dir: str, out_dir: str, batch_size: int) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ctx = distributed.init("ddp")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(ctx.device)
    answers = generate(model, tokenizer, prompts(tokenizer), MAX_NEW_TOKENS, batch_size, ctx)
    Path(out_dir, f"answers-{ctx.rank}.json").write_text(json.dumps(answers))
    distributed.barrier()  # every rank done before the group is torn down (see gradient_probe.py)
    distributed.destroy()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
