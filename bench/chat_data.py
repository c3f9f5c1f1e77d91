"""Variable-length chat rows for the throughput benchmark, deterministic per seed.

Real chat and instruction data is long-tailed: most conversations are short, a few are long. The
rows here are built from the corpus helpers of `finetune_trainer.testing.tiny` (its questions,
answers and sentences, which the tiny tokenizer was trained on):

- the user turn is the question alone, or (half of the rows) a context of k sentences before it,
  k ~ 1 + lognormal (median 2 sentences);
- the assistant turn is a few words (one row in five: the first 2-5 words of the answer), or the
  answer followed by k sentences, k ~ lognormal (median 4 sentences, sigma 1.1: a long tail, a
  few answers of 100+ sentences, which the trainer cuts to maxSeqLength).

With the tiny tokenizer (about 6 tokens per sentence) rows are 82 tokens long on average (median
68, 90th percentile 143, 99th 284, the longest cut at 512): batches padded to their longest row are
about half padding.
"""

from __future__ import annotations

import math
import random


def chat_rows(n: int, seed: int = 7) -> list[dict]:
    from finetune_trainer.testing.tiny import corpus_sentences, sample_rows

    rng = random.Random(seed)
    rows = []
    for i, row in enumerate(sample_rows("chat", n, seed=seed)):
        system, user, answer = (m["content"] for m in row["messages"])
        if rng.random() < 0.5:
            k = max(1, round(rng.lognormvariate(math.log(2), 1.0)))
            user = " ".join(corpus_sentences(k, seed=seed * 1_000_003 + 2 * i)) + " " + user
        if rng.random() < 0.2:
            answer = " ".join(answer.rstrip(".").split()[:rng.randint(2, 5)]) + "."
        else:
            k = round(rng.lognormvariate(math.log(4), 1.1))
            if k:
                answer += " " + " ".join(corpus_sentences(k, seed=seed * 1_000_003 + 2 * i + 1))
        rows.append({"messages": [{"role": "system", "content": system}, {"role": "user", "content": user},
                                  {"role": "assistant", "content": answer}]})
    return rows


def length_stats(lengths: list[int]) -> dict:
    """Mean, median and tail of a list of sequence lengths."""
    ordered = sorted(lengths)
    n = len(ordered)

    def quantile(q: float) -> int:
        return ordered[min(n - 1, int(q * n))]

    return {"rows": n, "mean": sum(ordered) / n, "median": quantile(0.5), "p10": quantile(0.1),
            "p90": quantile(0.9), "p99": quantile(0.99), "max": ordered[-1]}
