"""Put what the examples name into the local S3: a small model and small domain datasets.

The model is a small Llama-architecture model with random weights and a tokenizer trained on the
fly from the domain corpus (nothing is downloaded). The domain is the help desk of a fictional
object-storage product, "Orbit Storage": its questions follow patterns a small model learns on CPU
in a few dozen steps, so the demo's tuned perplexity falls clearly below the base model's.

    python -m e2e.localcluster.seed --endpoint http://127.0.0.1:PORT
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

DEMO_MODEL_URI = "s3://models/tiny-llama/"
# LoRA adapters of the demo model with small random weights, standing in for adapters a team trained earlier
# (examples/finetunejob-adapter-continue.yaml continues from one, -combine-adapters.yaml combines both).
ADAPTERS = {"s3://team-a/adapters/helpdesk-lora/": 1, "s3://team-a/adapters/billing-lora/": 2}
# A whole model: the demo model with helpdesk-lora merged in (examples/finetunejob-evaluate-model.yaml compares it
# with the demo model).
MERGED_MODEL = ("s3://team-a/models/helpdesk-merged/", "s3://team-a/adapters/helpdesk-lora/")
BUCKETS = ("models", "team-a")

_PLANS = [("starter", 2, "100 GB"), ("team", 10, "1 TB"), ("business", 50, "10 TB"), ("enterprise", 500, "100 TB")]
_REGIONS = ["eu-west", "us-east", "ap-south", "us-west"]
_ERRORS = {
    "403": "the access key lacks permission for the bucket; grant it under Keys",
    "404": "the object or the bucket does not exist in that region",
    "429": "the request rate is above the plan limit; retry with backoff",
    "507": "the bucket is over its quota; delete old objects or upgrade",
}
_TEAMS = ["acme", "globex", "initech", "umbrella", "hooli", "stark", "wayne", "wonka", "tyrell", "cyberdyne"]


def _plan_for(users: int) -> tuple[str, int, str]:
    return next(p for p in _PLANS if users <= p[1])


def domain_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """(question, answer) pairs of the Orbit Storage help desk, deterministic per seed. The
    answers follow rules (thresholds, lookups, copying the bucket name) a small model can learn."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        kind = rng.randrange(4)
        bucket = f"{rng.choice(_TEAMS)}-{rng.choice(['logs', 'backups', 'media', 'models'])}-{rng.randrange(100)}"
        if kind == 0:
            users = rng.randrange(1, 500)
            plan, _, quota = _plan_for(users)
            pairs.append((f"We are {users} people. Which plan fits us?",
                          f"For {users} users choose the {plan} plan; it includes {quota} of storage."))
        elif kind == 1:
            code = rng.choice(list(_ERRORS))
            pairs.append((f"Bucket {bucket} returns error {code}. Why?",
                          f"Error {code} on {bucket} means {_ERRORS[code]}."))
        elif kind == 2:
            region = rng.choice(_REGIONS)
            pairs.append((f"Can bucket {bucket} keep its data in {region}?",
                          f"Yes. Create {bucket} in {region}; its data never leaves {region}."))
        else:
            days = rng.randrange(1, 366)
            pairs.append((f"How do I delete objects in {bucket} older than {days} days?",
                          f"Add a lifecycle rule to {bucket} with an expiry of {days} days."))
    return pairs


def datasets() -> dict[str, list[dict]]:
    """Every dataset the examples name, by S3 URI."""
    from finetune_trainer.testing import tiny

    support = [{"messages": [{"role": "system", "content": "You are the Orbit Storage help desk."},
                             {"role": "user", "content": q}, {"role": "assistant", "content": a}]}
               for q, a in domain_pairs(480, seed=1)]
    faq = [{"instruction": q, "input": "", "output": a} for q, a in domain_pairs(160, seed=2)]
    wrong = [a for _, a in domain_pairs(160, seed=3)]
    preferences = [{"prompt": q, "chosen": a, "rejected": w if w != a else "I do not know."}
                   for (q, a), w in zip(domain_pairs(160, seed=4), wrong)]
    corpus = [{"text": f"{q} {a}"} for q, a in domain_pairs(400, seed=5)]
    # Thumbs up and down as a help desk collects them: the right answer liked, another question's answer not.
    feedback = [{"prompt": q, "completion": a if i % 2 == 0 else w, "label": i % 2 == 0 or w == a}
                for i, ((q, a), w) in enumerate(zip(domain_pairs(160, seed=6), [a for _, a in domain_pairs(160, seed=7)]))]
    # Held out for evaluation.tasks (questions the training rows do not have) and evaluation.general (text of
    # another domain: how much the help-desk tuning makes the model forget).
    held_out = [{"instruction": q, "input": "", "output": a} for q, a in domain_pairs(48, seed=9)]
    general = [{"text": sentence} for sentence in tiny.corpus_sentences(64, seed=10)]
    return {
        "s3://team-a/data/eval/helpdesk-questions.jsonl": held_out,
        "s3://team-a/data/eval/general.jsonl": general,
        "s3://team-a/data/support.jsonl": support,
        "s3://team-a/data/faq.jsonl": faq,
        "s3://team-a/data/instructions.jsonl": faq,
        "s3://team-a/data/preferences.jsonl": preferences,
        "s3://team-a/data/feedback.jsonl": feedback,
        "s3://team-a/data/corpus/part-0000.jsonl": corpus[:200],
        "s3://team-a/data/corpus/part-0001.jsonl": corpus[200:],
    }


# Files that examples name besides data sets: the term list of a content filter (termsUri).
FILES = {
    "s3://team-a/filters/blocked-terms.txt": (
        "# Terms a help desk must never train on: one per line, matched word by word, ignoring case.\n"
        "password\nsecret key\napi token\naccess key\n").encode(),
}


def seed(endpoint: str) -> None:
    from finetune_trainer.storage import Storage
    from finetune_trainer.testing import tiny

    from . import s3 as local_s3

    client = local_s3.client(endpoint)
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    for bucket in BUCKETS:
        if bucket not in existing:
            client.create_bucket(Bucket=bucket)
    storage = Storage(endpoint=endpoint, region=local_s3.REGION)
    for uri, rows in datasets().items():
        tiny.upload_rows(storage, uri, rows)
    for uri, data in FILES.items():
        storage.put_bytes(uri, data, content_type="text/plain")
    missing_adapters = [uri for uri in ADAPTERS if not storage.exists(uri + "adapter_config.json")]
    merged_uri, merged_from = MERGED_MODEL
    if (not storage.exists(DEMO_MODEL_URI + "config.json") or missing_adapters
            or not storage.exists(merged_uri + "config.json")):
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = tiny.save_tiny_model(Path(tmp) / "model", arch="llama", hidden_size=128, layers=4)
            storage.upload_dir(model_dir, DEMO_MODEL_URI)
            adapter_dirs = {uri: tiny.save_lora_adapter(model_dir, Path(tmp) / str(n), seed=n)
                            for uri, n in ADAPTERS.items()}
            for uri in missing_adapters:
                storage.upload_dir(adapter_dirs[uri], uri)
            storage.upload_dir(tiny.save_merged_model(model_dir, adapter_dirs[merged_from], Path(tmp) / "merged"),
                               merged_uri)


def main() -> int:
    import os

    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoint", required=True)
    args = parser.parse_args()
    from . import s3 as local_s3

    os.environ.setdefault("AWS_ACCESS_KEY_ID", local_s3.ACCESS_KEY)
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", local_s3.SECRET_KEY)
    seed(args.endpoint)
    print(f"seeded {args.endpoint}: {DEMO_MODEL_URI} and {len(datasets())} datasets")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
