"""`python -m bench.operator_scale --jobs 300`: what many FineTuneJobs cost the operator and the API server.

Runs against the local control plane (started here when none is running) with the operator from the
working tree, on the KWOK pool `cpu` (no training: each job's pod runs 5 s and succeeds). Phases:

1. baseline: the idle cluster, no jobs (what the other controllers and KWOK cost on their own);
2. N jobs created suspended: each is validated, gets its sandbox and a suspended PyTorchJob;
3. steady state with N suspended jobs (active runs: every pass applies the run's objects);
4. N jobs resumed and run to Succeeded;
5. steady state with N finished jobs; then the same with the operator restarted with
   `resyncSeconds: 0` (server-side applies on every pass), side by side;
6. deletion of all N: the finalizers remove the sandboxes.

In each steady window it reads, before and after: the API server's `apiserver_request_total` (by
verb and resource; the baseline is subtracted), the operator's reconcile counter and duration
histogram, the FineTuneJobs' resourceVersions (a status write changes it), and the operator
process's CPU time and resident memory. The section "The operator at scale" of
docs/benchmarks.md is replaced with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
import urllib.request
import uuid
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from e2e.localcluster import s3 as local_s3
from e2e.localcluster.cluster import LocalCluster
from e2e.localcluster.operator_process import OperatorProcess
from finetune_operator.builders import names as n
from finetune_operator.config import OperatorConfig

REPO = Path(__file__).resolve().parents[1]
NAMESPACE = "bench-scale"
WRITE_VERBS = {"POST", "PUT", "PATCH", "DELETE", "APPLY"}
SECTION_START, SECTION_END = "<!-- operator-scale:begin -->", "<!-- operator-scale:end -->"


# ---- measuring -----------------------------------------------------------------------------------


def api_requests(cluster: LocalCluster) -> Counter:
    """apiserver_request_total summed over codes and scopes: {(verb, resource): count}."""
    text = cluster.kubectl("get", "--raw", "/metrics").stdout
    counts: Counter = Counter()
    for family in text_string_to_metric_families(text):
        if family.name != "apiserver_request":
            continue
        for sample in family.samples:
            if sample.name == "apiserver_request_total":
                resource = sample.labels.get("resource", "")
                if sample.labels.get("subresource"):
                    resource += "/" + sample.labels["subresource"]
                counts[(sample.labels["verb"], resource)] += sample.value
    return counts


def operator_metrics(operator: OperatorProcess) -> dict:
    text = urllib.request.urlopen(operator.metrics_url(), timeout=10).read().decode()
    out = {"reconciles": 0.0, "buckets": {}, "seconds_sum": 0.0, "seconds_count": 0.0}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "finetune_reconcile_total":
                out["reconciles"] += s.value
            elif s.name == "finetune_reconcile_duration_seconds_bucket":
                out["buckets"][float(s.labels["le"])] = s.value
            elif s.name == "finetune_reconcile_duration_seconds_sum":
                out["seconds_sum"] = s.value
            elif s.name == "finetune_reconcile_duration_seconds_count":
                out["seconds_count"] = s.value
    return out


def process_usage(pid: int) -> tuple[float, float]:
    """(CPU seconds, resident MiB) of a process."""
    ticks = os.sysconf("SC_CLK_TCK")
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    rss_kib = int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))
    return cpu, rss_kib / 1024


def resource_versions(cluster: LocalCluster) -> dict[str, str]:
    items = json.loads(cluster.kubectl("get", "finetunejobs", "-n", NAMESPACE, "-o", "json").stdout)["items"]
    return {i["metadata"]["name"]: i["metadata"]["resourceVersion"] for i in items}


def quantile(buckets: dict[float, float], q: float) -> float:
    """Upper bound of the histogram bucket holding the q-quantile."""
    ordered = sorted(buckets.items())
    total = ordered[-1][1] if ordered else 0
    for bound, count in ordered:
        if total and count >= q * total:
            return bound
    return float("nan")


def snapshot(cluster: LocalCluster, operator: OperatorProcess, pid: int, jobs: int) -> tuple:
    """(API requests, operator metrics, operator (CPU s, RSS MiB), FineTuneJob resourceVersions)."""
    return (api_requests(cluster), operator_metrics(operator), process_usage(pid),
            resource_versions(cluster) if jobs else {})


def window(cluster: LocalCluster, operator: OperatorProcess, seconds: float, jobs: int) -> dict:
    pid = json.loads(operator.pid_file.read_text())["pid"]
    api0, op0, usage0, rv0 = snapshot(cluster, operator, pid, jobs)
    started = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - started
    api1, op1, usage1, rv1 = snapshot(cluster, operator, pid, jobs)
    delta_buckets = {b: op1["buckets"].get(b, 0) - op0["buckets"].get(b, 0) for b in op1["buckets"]}
    passes = op1["reconciles"] - op0["reconciles"]
    return {
        "seconds": elapsed,
        "api": api1 - api0,
        "passes": passes,
        "pass_seconds_mean": (op1["seconds_sum"] - op0["seconds_sum"]) / max(op1["seconds_count"] - op0["seconds_count"], 1),
        "pass_seconds_p99": quantile(delta_buckets, 0.99),
        "cpu_percent": 100 * (usage1[0] - usage0[0]) / elapsed,
        "rss_mib": usage1[1],
        "status_writes": sum(1 for k, v in rv1.items() if rv0.get(k) != v),
    }


# ---- the jobs ------------------------------------------------------------------------------------


def job(index: int, run: str, suspend: bool) -> dict:
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": f"job-{index:04d}", "namespace": NAMESPACE},
            "spec": {"model": {"uri": "s3://models/tiny-llama/"},
                     "datasets": [{"uri": "s3://team-a/data/support.jsonl", "format": "chat"}],
                     "method": {"type": "lora"}, "hyperparameters": {"maxSteps": 10},
                     "resources": {"workers": 1, "gpusPerWorker": 0, "nodePool": "cpu", "cpu": "100m",
                                   "memory": "256Mi"},
                     "output": {"uri": f"s3://team-a/bench-scale/{run}/job-{index:04d}/"},
                     "credentials": {"secretName": "s3-credentials"},
                     "runPolicy": {"backoffLimit": 0, "suspend": suspend}}}


def apply_jobs(cluster: LocalCluster, jobs: list[dict], batch: int = 100) -> None:
    for i in range(0, len(jobs), batch):
        cluster.kubectl("apply", "--server-side", "--field-manager=bench", "-f", "-",
                        input=yaml.safe_dump_all(jobs[i:i + batch]), timeout=300)


def phases(cluster: LocalCluster) -> Counter:
    items = json.loads(cluster.kubectl("get", "finetunejobs", "-n", NAMESPACE, "-o", "json").stdout)["items"]
    return Counter((i.get("status") or {}).get("phase", "-") for i in items)


def wait_for(cluster: LocalCluster, what: str, done, timeout: float) -> float:
    started = time.monotonic()
    while True:
        counts = phases(cluster)
        if done(counts):
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{what}: still {dict(counts)} after {timeout:.0f}s")
        time.sleep(3)


def sandboxes(cluster: LocalCluster) -> int:
    out = cluster.kubectl("get", "namespaces", "-l", f"{n.LABEL_TENANT}={NAMESPACE}", "-o", "name").stdout
    return len(out.split())


# ---- the report ----------------------------------------------------------------------------------


def per_second(counter: Counter, seconds: float) -> dict[tuple[str, str], float]:
    return {k: v / seconds for k, v in counter.items()}


def steady_rows(name: str, w: dict, baseline: dict, jobs: int) -> list[str]:
    own = per_second(w["api"], w["seconds"])
    base = per_second(baseline["api"], baseline["seconds"])
    extra = {k: own.get(k, 0) - base.get(k, 0) for k in set(own) | set(base)}
    reads = sum(v for (verb, _), v in extra.items() if verb not in WRITE_VERBS)
    writes = {k: v for k, v in extra.items() if k[0] in WRITE_VERBS and v > 0.05}
    passes_per_s = w["passes"] / w["seconds"]
    if passes_per_s < 0.5:  # (almost) no passes: per-pass figures mean nothing
        return [f"| {name} | {passes_per_s:.1f} | {reads:.1f} | – | {sum(writes.values()):.2f} | "
                f"{w['status_writes']} of {jobs} | – | {w['cpu_percent']:.0f}% | {w['rss_mib']:.0f} |",
                ", ".join(f"{verb} {res}: {v:.2f}/s" for (verb, res), v in sorted(writes.items())) or "none"]
    return [
        f"| {name} | {passes_per_s:.1f} | {reads:.1f} | {reads / passes_per_s:.1f} | "
        f"{sum(writes.values()):.2f} | {w['status_writes']} of {jobs} | {w['pass_seconds_mean'] * 1000:.0f} / "
        f"{w['pass_seconds_p99'] * 1000:.0f} | {w['cpu_percent']:.0f}% | {w['rss_mib']:.0f} |",
        ", ".join(f"{verb} {res}: {v:.2f}/s" for (verb, res), v in sorted(writes.items())) or "none",
    ]


def report(args, r: dict) -> str:
    cfg = r["config"]
    lines = [
        SECTION_START,
        "## The operator at scale",
        "",
        f"Written by `make bench-operator` (`python -m bench.operator_scale --jobs {args.jobs}`); measured "
        f"{r['when']} on the local control plane (2 cores; API server, etcd, controllers, KWOK, S3 and the "
        f"operator share them). {args.jobs} FineTuneJobs in one namespace on the KWOK pool `cpu` (each pod runs 5 s and "
        f"succeeds; no training). The operator's timer runs every {cfg.reconcileIntervalSeconds:.0f} s per job; "
        f"steady windows of {args.window:.0f} s, the idle cluster's own API traffic subtracted.",
        "",
        "| phase | seconds |",
        "|---|---:|",
        f"| create {args.jobs} jobs suspended, until every one has its sandbox and a suspended PyTorchJob | {r['t_create']:.0f} |",
        f"| resume all, until all Succeeded | {r['t_run']:.0f} |",
        f"| delete all, until the FineTuneJobs and their sandbox namespaces are gone | {r['t_delete']:.0f} |",
        "",
        "| steady state | passes/s | API reads/s | reads per pass | API writes/s | FineTuneJobs whose status was written | pass ms mean / p99 | operator CPU | operator RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = [steady_rows(f"{args.jobs} suspended (active) jobs", r["suspended"], r["baseline"], args.jobs),
            steady_rows(f"{args.jobs} suspended jobs, `resyncSeconds: 0` (applies on every pass)",
                        r["suspended_apply_always"], r["baseline"], args.jobs),
            steady_rows(f"{args.jobs} finished jobs", r["succeeded"], r["baseline"], args.jobs),
            steady_rows(f"{args.jobs} finished jobs, `idleReconcileSeconds: 0` (a pass every tick)",
                        r["finished_every_tick"], r["baseline"], args.jobs)]
    apply_ratio = r["suspended_apply_always"]["pass_seconds_mean"] / max(r["suspended"]["pass_seconds_mean"], 1e-9)
    cpu_ratio = r["finished_every_tick"]["cpu_percent"] / max(r["succeeded"]["cpu_percent"], 1e-9)
    lines += [row[0] for row in rows] + [
        "",
        "Writes in the steady windows (by verb and resource): "
        + "; ".join(f"{name}: {row[1]}" for name, row in zip(("suspended", "suspended, applies every pass",
                                                                 "finished", "finished, a pass every tick"), rows)) + ".",
        "",
        "A pass reads the FineTuneJob, its Secret and the sandbox namespace, and lists the run's "
        "PyTorchJobs, pods and exit events. It sends server-side applies only when the desired "
        "objects changed, the sandbox or the run is missing, or `resyncSeconds` "
        f"({cfg.resyncSeconds:.0f} s here) passed since the last apply. An unchanged apply "
        "writes nothing to etcd, but the API server still decodes and merges it: with applies on every "
        f"pass (second row, same run) a pass takes {apply_ratio:.1f}x as long. A job whose run finished "
        "(no TTL pending) is passed by the timer every `idleReconcileSeconds` "
        f"({cfg.idleReconcileSeconds:.0f} s) instead of every tick; spec changes and deletion "
        f"are still handled at once. With a pass every tick (last row) the operator uses {cpu_ratio:.1f}x "
        "the CPU. The status is written only when it changed, so a steady job costs reads only; a "
        "training job's status changes with its progress, at most once per pass. The operator only "
        "creates Events; PATCHes of events come from the other controllers' event recorders.",
              SECTION_END]
    return "\n".join(lines)


def existing_section(path: Path, start_marker: str = SECTION_START, end_marker: str = SECTION_END) -> str:
    """The section of `path` between the markers as it stands there, markers included ("" if none)."""
    text = path.read_text() if path.exists() else ""
    start, end = text.find(start_marker), text.find(end_marker)
    return text[start:end + len(end_marker)] if 0 <= start < end else ""


def write_section(path: Path, section: str, start_marker: str = SECTION_START, end_marker: str = SECTION_END) -> None:
    """Replace the section between the markers (or append it)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    old = existing_section(path, start_marker, end_marker)
    path.write_text(text.replace(old, section) if old else text.rstrip("\n") + "\n\n" + section + "\n")


# The timer of the recorded runs: the local cluster's dev config ticks every 3 s for a few test jobs, which
# is not how hundreds of jobs are run.
SCALE_CONFIG = {"reconcileIntervalSeconds": 10}


def restart(operator: OperatorProcess, interval: float, **overrides) -> None:
    """Restart the operator with OperatorConfig overrides; wait out the burst of resume passes."""
    print(f"operator restarted with {overrides or 'its defaults'}", flush=True)
    operator.down()
    operator.up(overrides={**SCALE_CONFIG, **overrides})
    time.sleep(2 * interval)


# ---- main ----------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.operator_scale", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--window", type=float, default=60.0, help="seconds of each steady-state window")
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()

    cluster = LocalCluster()
    cluster_here = not cluster.is_running()
    cluster.up()
    operator = OperatorProcess(cluster)
    operator_here = not operator.running()
    operator.up(overrides=SCALE_CONFIG)
    results: dict = {"when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                     "config": OperatorConfig.model_validate(yaml.safe_load(operator.config_file.read_text()))}
    run = uuid.uuid4().hex[:8]
    try:
        cluster.kubectl("create", "namespace", NAMESPACE)
        secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-credentials", "namespace": NAMESPACE},
                  "stringData": {"AWS_ACCESS_KEY_ID": local_s3.ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": local_s3.SECRET_KEY}}
        cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(secret))
        print(f"baseline window ({args.window:.0f}s)", flush=True)
        results["baseline"] = window(cluster, operator, args.window, 0)

        interval = results["config"].reconcileIntervalSeconds

        def settle(key: str, suspend: bool, phase: str, compare_key: str, **compare_overrides) -> None:
            """Apply every job, wait until all reach `phase`, then a steady window with the operator's
            defaults and one with `compare_overrides`, side by side."""
            started = time.monotonic()
            apply_jobs(cluster, [job(i, run, suspend=suspend) for i in range(args.jobs)])
            wait_for(cluster, phase, lambda c: c.get(phase, 0) == args.jobs, 1800)
            results[key] = time.monotonic() - started
            print(f"{args.jobs} jobs {phase} in {results[key]:.0f}s; steady windows", flush=True)
            time.sleep(interval)
            results[phase.lower()] = window(cluster, operator, args.window, args.jobs)
            restart(operator, interval, **compare_overrides)
            results[compare_key] = window(cluster, operator, args.window, args.jobs)
            restart(operator, interval)

        settle("t_create", True, "Suspended", "suspended_apply_always", resyncSeconds=0)
        settle("t_run", False, "Succeeded", "finished_every_tick", idleReconcileSeconds=0)

        started = time.monotonic()
        cluster.kubectl("delete", "finetunejobs", "--all", "-n", NAMESPACE, "--wait=true", "--timeout=1800s", timeout=1900)
        while sandboxes(cluster):
            time.sleep(3)
        results["t_delete"] = time.monotonic() - started
        print(f"deleted in {results['t_delete']:.0f}s", flush=True)
    finally:
        cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)
        if operator_here:
            operator.down()
        if cluster_here:
            cluster.down()
    section = report(args, results)
    write_section(args.output, section)
    print(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
