"""The real-training jobs of the end-to-end tier that several tests share, and the jobs that train in the
background: a session fixture applies them and returns at once, and their tests, later in the order, wait
for them and check them. When such a test is selected, the fixture is also requested by an earlier test
(e2e/conftest.py, `start_background_training`): the first of the trailing KWOK tests marked
`shares_the_node`, which leave the real node to others and mostly wait, or else the first real-training
test. So the node's 2 CPUs train while those tests wait, instead of one job after another at the end."""

from __future__ import annotations

import copy
import time
import uuid

import pytest
import yaml

from e2e.localcluster.paths import REPO_ROOT

# The session fixtures that apply jobs to train in the background.
BACKGROUND_TRAINING = ("side_by_side", "lr_search")

DEMO = REPO_ROOT / "examples" / "finetunejob-demo.yaml"


def demo_documents() -> tuple[dict, dict]:
    secret, job = list(yaml.safe_load_all(DEMO.read_text()))
    return secret, job


def small_job(name: str, **spec_changes) -> tuple[dict, dict]:
    """The demo job made small enough for a test: fewer steps, frequent checkpoints."""
    secret, job = demo_documents()
    job = copy.deepcopy(job)
    job["metadata"]["name"] = name
    spec = job["spec"]
    spec["hyperparameters"].update(maxSteps=12)
    spec["checkpoint"] = {"everySteps": 4, "keep": 2}
    spec["evaluation"] = {"compareToBase": True, "maxSamples": 24}
    # output.uri + runId identify a run (its checkpoints are resumed): every test run gets its own.
    spec["output"] = {"uri": f"s3://team-a/e2e/{name}-{uuid.uuid4().hex[:8]}/", "merge": False}
    for key, value in spec_changes.items():
        if value is None:
            spec.pop(key, None)
        else:
            spec[key] = value
    return secret, job


def job_status(kube, namespace, name) -> dict:
    return kube.get("finetunejob", name, namespace).get("status") or {}


VARIANTS = {
    "deepspeed-zero2": dict(distributed={"engine": "deepspeed", "zeroStage": 2, "precision": "fp32"}),
    "prefix-tuning": dict(method={"type": "prefix", "virtualTokens": 8}),
    "dpo": dict(objective="dpo", datasets=[{"uri": "s3://team-a/data/preferences.jsonl", "format": "preference"}]),
    "interleaved-multi-task": dict(preprocessing={"maxSeqLength": 128, "multiTask": {"strategy": "interleave",
                                                                                     "temperature": 2.0}}),
    "kto-feedback": dict(objective="kto", datasets=[{"uri": "s3://team-a/data/feedback.jsonl", "format": "feedback"}],
                         preprocessing={"maxSeqLength": 128, "contentFilters": [
                             # a term file in S3, read by the trainer: "access key" is in the 403 answers
                             {"name": "term-file", "type": "terms", "termsUri": "s3://team-a/filters/blocked-terms.txt",
                              "fields": "both", "action": "flag"},
                             {"name": "no-errors", "type": "regex", "patterns": [r"(?i)\berror 4\d\d\b"], "fields": "both"},
                             {"name": "plans", "type": "terms", "terms": ["plan"], "fields": "answer", "action": "flag"}]}),
    "two-stage": dict(datasets=None, stages=[
        {"name": "domain", "objective": "causal-lm",
         "datasets": [{"uri": "s3://team-a/data/corpus/", "format": "text"}]},
        {"name": "helpdesk", "objective": "sft",
         "datasets": [{"uri": "s3://team-a/data/support.jsonl", "format": "chat"}]},
    ]),
}
GATED = {
    "task-gated": dict(evaluation={"compareToBase": True, "maxSamples": 24, "tasks": [
        {"name": "helpdesk", "uri": "s3://team-a/data/eval/helpdesk-questions.jsonl", "maxSamples": 8,
         "maxNewTokens": 16, "gate": {"metric": "exactMatch", "minScore": 1.0}}]}),
    "gated": dict(evaluation={"compareToBase": True, "maxSamples": 24, "maxPerplexityRatio": 0.01}),
}


class SideBySide:
    """The variants and the gated jobs in one namespace, left to run side by side."""

    def __init__(self, kube, namespace: str, jobs: dict[str, dict]):
        self.kube, self.namespace, self.jobs = kube, namespace, jobs
        self._settled: dict[str, dict] | None = None

    def statuses(self, timeout: float = 900) -> dict[str, dict]:
        """Each job's settled status, waiting (once) until all are Succeeded or Failed; a job that did not
        settle in time has its last status, which its test reports."""
        if self._settled is None:
            settled: dict[str, dict] = {}
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and len(settled) < len(self.jobs):
                for name in set(self.jobs) - set(settled):
                    status = job_status(self.kube, self.namespace, name)
                    if status.get("phase") in ("Succeeded", "Failed"):
                        settled[name] = status
                time.sleep(2)
            for name in set(self.jobs) - set(settled):
                settled[name] = job_status(self.kube, self.namespace, name)
            self._settled = settled
        return self._settled


@pytest.fixture(scope="session")
def side_by_side(kube, operator) -> SideBySide:
    """The variants and the gated jobs, applied at once into one namespace and left to run side by side: a
    job's pods are limited to their CPU request, so that the 2-CPU node (beside CoreDNS and the operator) runs
    three one-worker jobs of 600m at a time, or a two-worker job of 2 x 400m beside one or two of them, and
    the scheduler queues the rest. The variants but ZeRO-2 train on one worker (the demo, the killed worker,
    the deletion and the preemption train on two), since one process starts (imports, model, data) for half
    the CPU of two; ZeRO-2 and the gated jobs on two (a gate failing on every rank)."""
    from e2e.conftest import make_namespace

    namespace = make_namespace(kube, "side-by-side")
    demo_resources = demo_documents()[1]["spec"]["resources"]
    one_worker = {**demo_resources, "workers": 1, "cpu": "600m"}
    two_workers = {**demo_resources, "workers": 2, "cpu": "400m"}
    resources = {"deepspeed-zero2": two_workers, **{name: two_workers for name in GATED}}
    jobs = {name: small_job(name, resources=resources.get(name, one_worker), **changes)[1]
            for name, changes in {**VARIANTS, **GATED}.items()}
    kube.apply(small_job("secret-only")[0], *jobs.values(), namespace=namespace)
    yield SideBySide(kube, namespace, jobs)
    kube.run("delete", "namespace", namespace, "--wait=false", check=False)


SEARCH_EXAMPLE = REPO_ROOT / "examples" / "finetunejob-search.yaml"


@pytest.fixture(scope="session")
def lr_search(kube, operator) -> tuple[str, dict]:
    """examples/finetunejob-search.yaml applied in a namespace of its own and left to train; returns the
    namespace and the job as applied. Its trials get one worker of 900m, not the example's 1 CPU, so that
    they fit beside a two-worker job of 500m on the 2-CPU node."""
    from e2e.conftest import make_namespace

    namespace = make_namespace(kube, "lr-search")
    secret, job = [d for d in yaml.safe_load_all(SEARCH_EXAMPLE.read_text()) if d]
    job["spec"]["output"]["uri"] = f"s3://team-a/e2e/lr-search-{uuid.uuid4().hex[:8]}/"
    job["spec"]["resources"]["cpu"] = "900m"
    kube.apply(secret, job, namespace=namespace)
    yield namespace, job
    kube.run("delete", "namespace", namespace, "--wait=false", check=False)
