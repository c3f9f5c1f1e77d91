"""A hyperparameter search with real training on the local node: examples/finetunejob-search.yaml,
four learning rates of the demo's LoRA SFT, one of which (3e-3) is clearly best. The best trial is
picked, a bad trial is pruned before its last step, and the promoted adapter is the best trial's: it
measures the perplexity recorded for it, and it fits the data better than the base model and every other
finished trial."""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

from e2e.localcluster.paths import REPO_ROOT
from e2e.tests.test_end_to_end import _download, _explain_failure, _keys, _s3, _status
from finetune_operator.builders import names as n
from finetune_trainer.config import evaluation_uri, progress_uri

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]

EXAMPLE = REPO_ROOT / "examples" / "finetunejob-search.yaml"
BEST_RATE = 3.0e-3


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir()
            if p.suffix in (".safetensors", ".json")}


def _read_json(local_cluster, uri: str) -> dict:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return json.loads(_s3(local_cluster).get_object(Bucket=bucket, Key=key)["Body"].read())


def test_a_learning_rate_search_prunes_a_bad_trial_and_promotes_the_best(kube, local_cluster, operator, namespace):
    secret, job = [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]
    name, spec = job["metadata"]["name"], job["spec"]
    output = spec["output"]["uri"] = f"s3://team-a/e2e/lr-search-{uuid.uuid4().hex[:8]}/"
    kube.apply(secret, job, namespace=namespace)

    deadline, status = time.monotonic() + 1200, {}
    while time.monotonic() < deadline:
        status = _status(kube, namespace, name)
        if status.get("phase") in ("Succeeded", "Failed"):
            break
        time.sleep(3)
    assert status.get("phase") == "Succeeded", _explain_failure(local_cluster, status) + json.dumps(status.get("search"))

    search = status["search"]
    trials = {t["number"]: t for t in search["trials"]}
    assert sorted(t["parameters"]["learningRate"] for t in trials.values()) == \
        sorted(spec["search"]["parameters"]["learningRate"]["values"])
    best = search["best"]
    assert best["parameters"]["learningRate"] == pytest.approx(BEST_RATE), search
    finished = [t for t in trials.values() if t["phase"] == "Succeeded"]
    assert min(finished, key=lambda t: t["value"])["number"] == best["number"]

    max_steps, every_steps = spec["hyperparameters"]["maxSteps"], spec["evaluation"]["everySteps"]
    pruned = [t for t in trials.values() if t["phase"] == "Pruned"]
    assert pruned, f"no trial was pruned: {search}"
    for trial in pruned:
        assert trial["parameters"]["learningRate"] < BEST_RATE
        assert trial["step"] < max_steps and trial["message"].startswith(f"pruned at step {trial['step']} "), trial
    # A trial started once the first finished is judged against it at its first evaluation, and stopped there:
    # its trainer never got to its last step. (One that trained beside the first may be judged later, on
    # reports read late, and its trainer run on for the seconds until its pods stop.)
    stopped_early = [t for t in pruned if t["step"] == every_steps]
    assert stopped_early, f"no trial was pruned at its first evaluation: {search}"
    for trial in stopped_early:
        progress = _read_json(local_cluster, progress_uri(n.trial_output_uri(output, trial["number"]), "1"))
        assert progress["step"] < max_steps, (trial, progress["step"])
        assert not _keys(local_cluster, n.trial_output_uri(output, trial["number"]) + "adapter/")
    assert search["promoted"] and search["reportUri"].startswith(output)
    report = _keys(local_cluster, search["reportUri"].rsplit("/", 1)[0] + "/")
    assert any(k.endswith("search-validation.png") for k in report) and any(k.endswith("search-report.json")
                                                                             for k in report), report

    # The promoted adapter is the best trial's; it loads, and the promoted output's evaluation measures the
    # metric the search recorded for the best trial (evalLoss: the log of the perplexity).
    promoted_perplexity = _read_json(local_cluster, evaluation_uri(output, "1"))["perplexity"]
    recorded = best["value"] if search["metric"] == "perplexity" else math.exp(best["value"])
    assert promoted_perplexity == pytest.approx(recorded, rel=1e-5), (promoted_perplexity, best)
    assert status["evaluation"]["perplexity"] == pytest.approx(promoted_perplexity, rel=1e-4)  # rounded to 4 decimals
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Measured here on the demo's rows, as plain text: the promoted adapter is far better than the base, and
    # better than every other trial that finished (their adapters were written too).
    others = [t for t in finished if t["number"] != best["number"]]
    with tempfile.TemporaryDirectory() as tmp:
        base = _download(local_cluster, spec["model"]["uri"], Path(tmp, "base"))
        promoted = _download(local_cluster, status["output"]["adapterUri"], Path(tmp, "promoted"))
        best_adapter = _download(local_cluster, n.trial_output_uri(output, best["number"]) + "adapter/", Path(tmp, "best"))
        assert _digests(promoted) == _digests(best_adapter) and _digests(promoted)
        tokenizer = AutoTokenizer.from_pretrained(promoted)
        bucket, _, key = spec["datasets"][0]["uri"].removeprefix("s3://").partition("/")
        lines = _s3(local_cluster).get_object(Bucket=bucket, Key=key)["Body"].read().decode().splitlines()
        texts = ["\n".join(m["content"] for m in json.loads(line)["messages"]) for line in lines[:24] if line.strip()]

        def loss_of(adapter: Path | None) -> float:
            model = AutoModelForCausalLM.from_pretrained(base)
            if adapter is not None:
                model = PeftModel.from_pretrained(model, adapter)
            model.eval()
            total = 0.0
            with torch.no_grad():
                for text in texts:
                    ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=128).input_ids
                    total += float(model(ids, labels=ids).loss)
            return total / len(texts)

        promoted_loss, base_loss = loss_of(promoted), loss_of(None)
        assert math.isfinite(promoted_loss) and promoted_loss < base_loss - 0.5, (promoted_loss, base_loss)
        for trial in others:
            adapter = _download(local_cluster, n.trial_output_uri(output, trial["number"]) + "adapter/",
                                Path(tmp, f"t{trial['number']}"))
            assert promoted_loss < loss_of(adapter), (trial, promoted_loss)

    # One event per trial pruned, naming it and where it stopped.
    events = json.loads(kube.run("get", "events", "-n", namespace, "-o", "json").stdout)["items"]
    pruned_events = [e["message"] for e in events if e["involvedObject"]["name"] == name and e["reason"] == "TrialPruned"]
    assert sorted(pruned_events) == sorted(f"trial t{t['number']}: {t['message']}" for t in pruned), pruned_events
