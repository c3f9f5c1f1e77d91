"""`make demo`: the whole chain on this machine, with real training.

Starts the local cluster (building it the first time: binaries and images), S3 with a small model
and the Orbit Storage help-desk data, Prometheus and the real node; installs the operator with its
Helm chart; applies examples/finetunejob-demo.yaml (LoRA, 2 workers, CPU: two containers of the
trainer image); shows live progress from the FineTuneJob's status; ends with where the adapter and
merged model are and the base and tuned perplexity.
"""

from __future__ import annotations

import json
import sys
import time

from e2e.localcluster import s3 as local_s3
from e2e.localcluster.cluster import LocalCluster
from e2e.localcluster.operator_release import OperatorRelease
from e2e.localcluster.paths import REPO_ROOT

NAMESPACE = "demo"
MANIFEST = REPO_ROOT / "examples" / "finetunejob-demo.yaml"
JOB = "orbit-helpdesk"
TIMEOUT_SECONDS = 1200


def progress_line(status: dict, width: int = 30) -> str:
    """One line of live progress from a FineTuneJob status (a pure function, for tests too)."""
    progress = status.get("progress") or {}
    percent = float(progress.get("percent") or 0)
    filled = int(width * min(percent, 100) / 100)
    bar = "#" * filled + "." * (width - filled)
    parts = [f"[{bar}] {percent:5.1f}%", f"phase {status.get('phase', 'Pending')}"]
    if progress.get("totalSteps"):
        parts.append(f"step {progress.get('step', 0)}/{progress['totalSteps']}")
    if progress.get("loss") is not None:
        parts.append(f"loss {progress['loss']:.3f}")
    if progress.get("tokensPerSecond"):
        parts.append(f"{progress['tokensPerSecond']:.0f} tok/s")
    if progress.get("etaSeconds") is not None and status.get("phase") == "Running":
        parts.append(f"ETA {int(progress['etaSeconds'])}s")
    return "  ".join(parts)


def _true_conditions(status: dict) -> list[dict]:
    return [c for c in status.get("conditions") or [] if c.get("status") == "True"]


def run_demo() -> int:
    t0 = time.monotonic()
    cluster = LocalCluster().up()
    operator = OperatorRelease(cluster)
    operator.up()
    cluster.kubectl("create", "namespace", NAMESPACE, check=False)
    # A demo run always starts fresh: the previous run's job (and its sandbox) go first, and so do
    # its outputs, since output.uri + runId identify a run whose checkpoints would be resumed.
    cluster.kubectl("delete", "finetunejob", JOB, "-n", NAMESPACE, "--ignore-not-found", "--wait=true",
                    "--timeout=180s")
    _delete_prefix(cluster, "team-a", "models/orbit-helpdesk/")
    cluster.kubectl("apply", "-n", NAMESPACE, "-f", str(MANIFEST))
    print(f"\napplied {MANIFEST.relative_to(REPO_ROOT)} in namespace {NAMESPACE}; training for real in 2 containers"
          f" on {cluster.image('trainer')}\n")

    interactive = sys.stdout.isatty()
    last_print = 0.0
    status: dict = {}
    deadline = time.monotonic() + TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        out = cluster.kubectl("get", "finetunejob", JOB, "-n", NAMESPACE, "-o", "json", check=False)
        if out.returncode == 0:
            status = json.loads(out.stdout).get("status") or {}
        line = progress_line(status)
        if interactive:
            print("\r" + line.ljust(110), end="", flush=True)
        elif time.monotonic() - last_print > 10:
            print(line, flush=True)
            last_print = time.monotonic()
        if status.get("phase") in ("Succeeded", "Failed"):
            break
        time.sleep(2)
    print()
    elapsed = time.monotonic() - t0
    if status.get("phase") != "Succeeded":
        print(f"\nthe demo job did not succeed (phase {status.get('phase')!r}) after {elapsed:.0f}s:")
        for cond in _true_conditions(status):
            print(f"  {cond['type']}: {cond.get('reason')}: {cond.get('message')}")
        print(f"  operator log: kubectl logs -n {operator.namespace} deploy/{operator.deployment}")
        print(f"  pod output:   make pod-logs NS={status.get('sandboxNamespace', '<sandbox>')} POD=<pod>")
        return 1

    evaluation = status.get("evaluation") or {}
    output = status.get("output") or {}
    print(f"\nSucceeded in {elapsed:.0f}s.")
    print(f"  adapter:       {output.get('adapterUri')}")
    print(f"  merged model:  {output.get('mergedUri')}")
    print(f"  checkpoints:   {[c['uri'] for c in status.get('checkpoints') or []]}")
    if evaluation.get("basePerplexity"):
        ratio = evaluation["perplexity"] / evaluation["basePerplexity"]
        print(f"  perplexity:    base {evaluation['basePerplexity']:.1f} -> tuned {evaluation['perplexity']:.1f}"
              f" (ratio {ratio:.2f}) on the held-out validation split")
    for task in evaluation.get("tasks") or []:
        gain = f" ({task['delta']:+.3f} over the base model's {task['base']:.3f})" if "delta" in task else ""
        print(f"  task {task['name']}:  {task['metric']} {task['tuned']:.3f}{gain}")
    if evaluation.get("generalBasePerplexity"):
        print(f"  forgetting:    general perplexity {evaluation['generalBasePerplexity']:.1f} -> "
              f"{evaluation['generalPerplexity']:.1f}")
    if evaluation.get("reportUri"):
        print(f"  report:        {evaluation['reportUri']}report.md (and report.html, loss.png, learning-rate.png)")
    print(_look_around(cluster, operator, status))
    return 0


def _delete_prefix(cluster: LocalCluster, bucket: str, prefix: str) -> None:
    client = local_s3.client(cluster.s3_endpoint)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys})


def _look_around(cluster: LocalCluster, operator: OperatorRelease, status: dict) -> str:
    sandbox = status.get("sandboxNamespace", "")
    return f"""
Look around:
  export KUBECONFIG={cluster.kubeconfig} PATH={cluster.bin}:$PATH
  kubectl get ftj -n {NAMESPACE} -o wide            # the job, its progress and outcome
  kubectl describe ftj -n {NAMESPACE} {JOB}          # conditions and events
  kubectl get all,networkpolicy,resourcequota -n {sandbox}
  make pod-logs NS={sandbox} POD=train-1-master-0    # the trainer's output
  S3 ({cluster.s3_endpoint}, key finetune-local / finetune-local-secret):
    .venv/bin/python -c "import boto3; c=boto3.client('s3', endpoint_url='{cluster.s3_endpoint}', aws_access_key_id='finetune-local', aws_secret_access_key='finetune-local-secret', region_name='us-east-1'); print([o['Key'] for o in c.list_objects_v2(Bucket='team-a', Prefix='models/orbit-helpdesk/')['Contents']])"
  kubectl logs -n {operator.namespace} deploy/{operator.deployment}   # the operator, installed by its chart
  Prometheus: {cluster.prometheus_url}/graph?g0.expr=finetune_job_progress_ratio
Stop everything: make cluster-down"""


if __name__ == "__main__":
    sys.exit(run_demo())
