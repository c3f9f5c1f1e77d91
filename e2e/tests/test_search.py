"""A hyperparameter search (spec.search) on the KWOK pools: trials run as PyTorchJobs in waves of
`parallelism`, the status and Events follow them, an operator killed in the middle of the search
neither loses nor duplicates a trial, and the best trial's output is promoted to output.uri.

KWOK pods train nothing, so the test writes what each trial's trainer would write to S3 (its
progress with the validation history, its evaluation, its result and an adapter file) before the
trials start: trial N's final validation loss is LOSSES[N], so trial 3 is the best."""

from __future__ import annotations

import json
import math
import time
from datetime import datetime, timezone

import pytest

from e2e.localcluster import s3 as local_s3
from e2e.tests.test_operator_cluster import (
    cfg,  # noqa: F401 - a fixture
    conditions,
    credentials,
    events_with_reason,
    ftj,
    items,
    job_uid,
    sandbox_of,
    status_of,
    wait_phase,
)
from finetune_operator.builders import names as n
from finetune_trainer.config import evaluation_uri, progress_uri, result_uri

pytestmark = pytest.mark.cluster

LOSSES = [2.0, 1.8, 1.9, 1.2, 1.7, 1.6]
RATES = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]


def _put(client, uri: str, body: bytes) -> None:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    client.put_object(Bucket=bucket, Key=key, Body=body)


def write_trial_documents(client, output_uri: str, run_id: str, number: int, loss: float) -> None:
    """What trial `number`'s trainer would leave in S3 after 10 steps with validation every 5."""
    trial = n.trial_output_uri(output_uri, number)
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    progress = {"step": 10, "totalSteps": 10, "evalLoss": loss, "updatedAt": now,
                "evalHistory": [{"step": 5, "evalLoss": loss + 0.5}, {"step": 10, "evalLoss": loss}]}
    _put(client, progress_uri(trial, run_id), json.dumps(progress).encode())
    _put(client, evaluation_uri(trial, run_id),
         json.dumps({"basePerplexity": 20.0, "perplexity": math.exp(loss), "passed": True}).encode())
    _put(client, result_uri(trial, run_id), json.dumps({"succeeded": True, "reason": "Succeeded",
                                                         "adapterUri": f"{trial}adapter/"}).encode())
    _put(client, f"{trial}adapter/adapter_model.safetensors", f"weights of trial {number}".encode())
    _put(client, f"{trial}checkpoints/{run_id}/step-00000005/manifest.json", b"{}")


def test_a_search_runs_in_waves_survives_an_operator_restart_and_promotes_the_best(kube, operator, cfg, namespace,
                                                                                   local_cluster):
    job = ftj("search", evaluation={"everySteps": 5, "compareToBase": True, "maxPerplexityRatio": 1.0},
              search={"parameters": {"learningRate": {"values": RATES}}, "trials": 6, "parallelism": 2,
                      "strategy": "grid", "seed": 7, "pruning": {"rule": "none"}})
    output, run_id = job["spec"]["output"]["uri"], "1"
    client = local_s3.client(local_cluster.s3_endpoint)
    for number, loss in enumerate(LOSSES):
        write_trial_documents(client, output, run_id, number, loss)

    kube.apply(credentials(), job, namespace=namespace)
    sandbox = sandbox_of(kube, cfg, namespace, "search")

    def unfinished_trials() -> list[str]:
        return [p["metadata"]["name"] for p in items(kube, "pytorchjobs", namespace=sandbox)
                if not any(c["type"] in ("Succeeded", "Failed") and c["status"] == "True"
                           for c in (p.get("status") or {}).get("conditions") or [])]

    # The waves: `parallelism` unfinished trials at once, never more; the operator is killed once the
    # second wave has started and comes back while it runs.
    most, killed, deadline = 0, False, time.monotonic() + 240
    while time.monotonic() < deadline:
        most = max(most, len(unfinished_trials()))
        trials = (status_of(kube, namespace, "search").get("search") or {}).get("trials") or []
        if not killed and len(trials) >= 3:
            operator.kill()
            time.sleep(3)
            operator.up(log=lambda *_: None)
            killed = True
        if status_of(kube, namespace, "search").get("phase") in ("Succeeded", "Failed"):
            break
        time.sleep(1)
    assert killed
    status = wait_phase(kube, namespace, "search", "Succeeded", timeout=60)
    assert most == 2, most  # a wave: both trials of it at once (each runs 5 s on KWOK), never a third

    search = status["search"]
    assert [t["number"] for t in search["trials"]] == list(range(6))
    assert sorted(t["parameters"]["learningRate"] for t in search["trials"]) == sorted(RATES)  # each grid point once
    assert all(t["phase"] == "Succeeded" for t in search["trials"]), search["trials"]
    assert {t["number"]: t["value"] for t in search["trials"]} == pytest.approx(dict(enumerate(LOSSES)))
    assert search["best"]["number"] == 3 and search["best"]["value"] == pytest.approx(1.2)
    assert search["progress"] == "6/6" and search["succeeded"] == 6 and search["promoted"]
    assert [p["step"] for p in search["trials"][3]["history"]] == [5, 10]
    runs = {int(p["metadata"]["labels"][n.LABEL_TRIAL]): p for p in items(kube, "pytorchjobs", namespace=sandbox)}
    assert sorted(p["metadata"]["name"] for p in runs.values()) == sorted(n.trial_pytorchjob_name(run_id, i) for i in range(6))

    # Three waves: a trial is made only once a slot is free, i.e. when all but one of the trials before it
    # have finished (by the API server's timestamps; RFC 3339 in UTC, ordered as strings).
    def finished_at(run: dict) -> str:
        done = next(c for c in run["status"]["conditions"] if c["type"] == "Succeeded" and c["status"] == "True")
        return run["status"].get("completionTime") or done["lastTransitionTime"]

    for k in range(2, 6):
        made = runs[k]["metadata"]["creationTimestamp"]
        done_before = [j for j in range(k) if finished_at(runs[j]) <= made]
        assert len(done_before) >= k - 1, (k, made, {j: finished_at(runs[j]) for j in range(k)})

    # The best trial's adapter is the job's output; checkpoints stay with the trial.
    bucket, _, prefix = output.removeprefix("s3://").partition("/")
    promoted = client.get_object(Bucket=bucket, Key=f"{prefix}adapter/adapter_model.safetensors")["Body"].read()
    assert promoted == b"weights of trial 3"
    assert not client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}checkpoints/").get("Contents")
    report_key = search["reportUri"].removeprefix(f"s3://{bucket}/")
    report = client.get_object(Bucket=bucket, Key=report_key)["Body"].read().decode()
    assert "learningRate" in report and "search-validation.png" in report
    assert status["evaluation"]["perplexity"] == pytest.approx(math.exp(1.2), rel=1e-3)
    assert "t3" in conditions(status)["Succeeded"]["message"]

    for reason, count in (("TrialStarted", 6), ("TrialSucceeded", 6), ("BestTrialPromoted", 1)):
        seen = events_with_reason(kube, namespace, reason)
        assert len({e["message"] for e in seen}) == count, (reason, [e["message"] for e in seen])
    table = kube.run("get", "ftj", "search", "-n", namespace).stdout
    assert "TRIALS" in table and "6/6" in table and "BEST" in table, table
    assert job_uid(kube, namespace, "search")


def test_a_search_whose_best_trial_fails_the_gate_fails_with_the_numbers(kube, operator, cfg, namespace, local_cluster):
    job = ftj("gated", evaluation={"compareToBase": True, "maxPerplexityRatio": 0.05},
              search={"parameters": {"loraRank": {"values": [4, 8]}}, "trials": 2, "parallelism": 2,
                      "strategy": "grid", "pruning": {"rule": "none"}})
    client = local_s3.client(local_cluster.s3_endpoint)
    for number in range(2):
        write_trial_documents(client, job["spec"]["output"]["uri"], "1", number, LOSSES[number])
    kube.apply(credentials(), job, namespace=namespace)
    status = wait_phase(kube, namespace, "gated", "Failed", timeout=120)
    failed = conditions(status)["Failed"]
    assert failed["reason"] == "EvaluationGateFailed", failed
    assert "maxPerplexityRatio 0.05" in failed["message"] and "t1" in failed["message"], failed
    assert status["search"]["promoted"]  # the outputs are written for the user to inspect
