"""The chart's alerts, run through the real `promtool test rules` on the series the operator and the
trainer export: each alert fires for the case it is for, with the job's own `namespace` and `name`,
and stays quiet for the look-alikes that fired falsely before (a suspended job, a restarted trainer,
a failure long past). Every alert links its runbook, a section of docs/operations.md."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import yaml

from finetune_operator.api.types import Phase
from tests.chart.chartkit import REPO, named, one
from tests.chart.promkit import (DOCS, MONITORING_ON, alerts_of, exported_names, metric_names_in, promtool_run,
                                 rule_groups, run_promtool_test, runbook_url)

OPERATIONS_MD = REPO / "docs" / "operations.md"
DEFAULT_STALL_SECONDS = 900
ALL_ALERTS = {"FineTuneJobFailed", "FineTuneJobProgressStalled", "FineTuneJobCheckpointStale", "FineTuneOperatorDown",
              "FineTuneOperatorReconcileErrors", "FineTuneTenantBudgetNearlyUsed", "FineTuneTenantBudgetExhausted"}
JOB_ALERTS = {"FineTuneJobFailed", "FineTuneJobProgressStalled", "FineTuneJobCheckpointStale"}
MINUTES = 180  # length of every input series, in 1m samples


def humanize_duration(seconds: int) -> str:
    """Prometheus' humanizeDuration for whole seconds."""
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes}m {secs}s"
    if hours:
        return f"{hours}h {minutes}m {secs}s"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def constant(value: float, from_minute: int = 0) -> str:
    """A series absent before from_minute, then constant to the end."""
    absent = f"_x{from_minute} " if from_minute else ""  # _xN: N missing samples
    return f"{absent}{value:g}x{MINUTES - from_minute}"


# ---- the operator's per-job series -------------------------------------------------------------

@dataclass
class Job:
    """A FineTuneJob as the operator's metrics show it: its phases over time (phase, from minute)
    and its timestamps (Unix seconds; promtool's clock starts at 0)."""
    namespace: str
    name: str
    phases: list[tuple[Phase, int]]
    heartbeat: float | None = None  # finetune_job_last_progress_timestamp_seconds
    completed: tuple[float, int] | None = None  # (completion timestamp, first minute exported)
    operator_pod: str = "finetune-operator-5c9f7d-x2k4p"  # the target that exports the series

    @property
    def labels(self) -> str:
        """The job's labels and the target labels a scrape through the chart's ServiceMonitor adds."""
        return (f'namespace="{self.namespace}", name="{self.name}", job="finetune-operator-metrics", '
                f'service="finetune-operator-metrics", endpoint="metrics", pod="{self.operator_pod}", '
                f'instance="{self.operator_pod}:8080"')

    def series(self) -> list[dict]:
        out = []
        for phase in Phase:
            values = []
            for index, (current, start) in enumerate(self.phases):
                end = self.phases[index + 1][1] if index + 1 < len(self.phases) else MINUTES + 1
                values.append(f"{1 if current == phase else 0}x{end - start - 1}")
            out.append({"series": f'finetune_job_phase{{{self.labels}, phase="{phase.value}"}}',
                        "values": " ".join(values)})
        if self.heartbeat is not None:
            out.append({"series": f"finetune_job_last_progress_timestamp_seconds{{{self.labels}}}",
                        "values": constant(self.heartbeat)})
        if self.completed is not None:
            at, from_minute = self.completed
            out.append({"series": f"finetune_job_completion_timestamp_seconds{{{self.labels}}}",
                        "values": constant(at, from_minute)})
        return out


def alert_test(alertname: str, eval_minute: int, series: list[dict], expected: list[dict]) -> dict:
    return {"input_series": series,
            "alert_rule_test": [{"eval_time": f"{eval_minute}m", "alertname": alertname, "exp_alerts": expected}]}


# ---- FineTuneJobProgressStalled ----------------------------------------------------------------

def job_alert(alertname: str, job: Job, summary: str, description: str) -> dict:
    """The alert promtool should see for one FineTuneJob: a warning labelled with its namespace and name."""
    return {"exp_labels": {"severity": "warning", "namespace": job.namespace, "name": job.name},
            "exp_annotations": {"summary": summary, "description": description, "runbook_url": runbook_url(alertname)}}


def stalled_alert(job: Job, age: int, threshold: int = DEFAULT_STALL_SECONDS) -> dict:
    who = f"{job.namespace}/{job.name}"
    return job_alert("FineTuneJobProgressStalled", job, f"FineTuneJob {who} makes no progress",
                     f"FineTuneJob {who} reported no training progress for {humanize_duration(age)} "
                     f"(threshold: config.progressStallSeconds = {threshold} s).")


@dataclass
class StallCase:
    job: Job
    eval_minute: int
    fires: bool
    threshold: int | None = None  # config.progressStallSeconds; None: the chart's default


RUNNING = [(Phase.Running, 0)]
STALL_CASES = {
    "running-heartbeat-older-than-threshold-fires": StallCase(Job("team-a", "llama", RUNNING, heartbeat=0), 16, True),
    "running-heartbeat-younger-than-threshold-is-quiet": StallCase(Job("team-a", "llama", RUNNING, heartbeat=0), 14,
                                                                   False),
    "operator-says-stalled-fires": StallCase(Job("team-a", "llama", [(Phase.Stalled, 0)], heartbeat=0), 20, True),
    "suspended-job-is-quiet": StallCase(Job("team-a", "paused", [(Phase.Running, 0), (Phase.Suspended, 5)],
                                            heartbeat=0), 60, False),
    "queued-job-is-quiet": StallCase(Job("team-a", "waiting", [(Phase.Queued, 0)], heartbeat=0), 60, False),
    "succeeded-job-is-quiet": StallCase(Job("team-a", "done", [(Phase.Running, 0), (Phase.Succeeded, 10)],
                                            heartbeat=300), 60, False),
    "custom-threshold-fires-earlier": StallCase(Job("team-a", "llama", RUNNING, heartbeat=0), 6, True, threshold=300),
    "custom-threshold-not-before-it": StallCase(Job("team-a", "llama", RUNNING, heartbeat=0), 4, False, threshold=300),
    "custom-threshold-later-than-default": StallCase(Job("team-a", "llama", RUNNING, heartbeat=0), 16, False,
                                                     threshold=1800),
}


@pytest.mark.parametrize("case", STALL_CASES.values(), ids=list(STALL_CASES))
def test_progress_stalled_fires_for_a_running_job_whose_heartbeat_is_older_than_the_threshold(
        helm_cli, promtool, tmp_path, case):
    threshold_args = () if case.threshold is None else ("--set", f"config.progressStallSeconds={case.threshold}")
    groups = rule_groups(helm_cli, *threshold_args)
    age = case.eval_minute * 60 - int(case.job.heartbeat or 0)
    expected = [stalled_alert(case.job, age, case.threshold or DEFAULT_STALL_SECONDS)] if case.fires else []
    run_promtool_test(promtool, tmp_path, groups, alert_test(
        "FineTuneJobProgressStalled", case.eval_minute, case.job.series(), expected))


def test_progress_stalled_fires_per_job_among_others(helm_cli, promtool, tmp_path):
    stuck = Job("team-a", "stuck", RUNNING, heartbeat=0)
    jobs = [stuck, Job("team-a", "healthy", RUNNING, heartbeat=1500), Job("team-b", "stuck", [(Phase.Suspended, 0)],
                                                                        heartbeat=0)]
    groups = rule_groups(helm_cli)
    run_promtool_test(promtool, tmp_path, groups, alert_test(
        "FineTuneJobProgressStalled", 30, [s for job in jobs for s in job.series()],
        [stalled_alert(stuck, 1800)]))


def replaced(job: Job) -> Job:
    """The same job as exported by the operator's next pod (after a crash, a reschedule or an upgrade)."""
    return Job(job.namespace, job.name, job.phases, job.heartbeat, job.completed, "finetune-operator-5c9f7d-q8m2z")


def test_progress_stalled_fires_once_whichever_operator_pod_exports_the_job(helm_cli, promtool, tmp_path):
    stuck = Job("team-a", "stuck", RUNNING, heartbeat=0)
    run_promtool_test(promtool, tmp_path, rule_groups(helm_cli), alert_test(
        "FineTuneJobProgressStalled", 30, stuck.series() + replaced(stuck).series(), [stalled_alert(stuck, 1800)]))


def test_progress_stalled_rule_is_left_out_when_the_threshold_is_zero(helm_cli):
    alerts = alerts_of(rule_groups(helm_cli, "--set", "config.progressStallSeconds=0"))
    assert "FineTuneJobProgressStalled" not in alerts
    assert ALL_ALERTS - {"FineTuneJobProgressStalled"} == set(alerts)


def test_stall_alert_and_operator_condition_read_the_same_chart_value(helm_cli):
    """One threshold: the value rendered into the operator's config is the one in the alert."""
    objects = helm_cli.render(*MONITORING_ON, "--set", "config.progressStallSeconds=1234")
    expr = alerts_of(one(objects, "PrometheusRule")["spec"]["groups"])["FineTuneJobProgressStalled"]["expr"]
    assert "> 1234)" in expr
    config_map = named(objects, "ConfigMap", "-config")
    assert re.search(r"progressStallSeconds\W+1234\b", str(config_map["data"]))


# ---- FineTuneJobCheckpointStale ----------------------------------------------------------------

@dataclass
class Trainer:
    """The rank-0 trainer of a job, as the PodMonitor's relabelings label it."""
    namespace: str
    name: str
    step: str  # values of finetune_trainer_step
    total_steps: str
    checkpoints: str  # values of finetune_trainer_checkpoints_total
    last_checkpoint: str  # values of finetune_trainer_last_checkpoint_timestamp_seconds
    pod: str = ""

    @property
    def sandbox(self) -> str:
        return f"ftj-{self.namespace}-{self.name}"

    def series(self) -> list[dict]:
        labels = (f'namespace="{self.namespace}", name="{self.name}", sandbox="{self.sandbox}", '
                  f'pod="{self.pod or self.name + "-master-0"}"')
        return [{"series": f"{metric}{{{labels}}}", "values": values} for metric, values in (
            ("finetune_trainer_step", self.step), ("finetune_trainer_total_steps", self.total_steps),
            ("finetune_trainer_checkpoints_total", self.checkpoints),
            ("finetune_trainer_last_checkpoint_timestamp_seconds", self.last_checkpoint))]


def stale_alert(trainer: Trainer, age: int) -> dict:
    who = f"{trainer.namespace}/{trainer.name}"
    pod = trainer.pod or trainer.name + "-master-0"
    return {"exp_labels": {"severity": "warning", "namespace": trainer.namespace, "name": trainer.name,
                           "sandbox": trainer.sandbox, "pod": pod},
            "exp_annotations": {
                "summary": f"FineTuneJob {who} saved no checkpoint for {humanize_duration(age)}",
                "description": f"The trainer of FineTuneJob {who} (pod {pod} in {trainer.sandbox}) saved no "
                               f"checkpoint for {humanize_duration(age)} while training; a preemption or failure "
                               "would lose that work.",
                "runbook_url": runbook_url("FineTuneJobCheckpointStale")}}


# Checkpoint at 10m, then nothing: stuck in training (steps still below the total).
STUCK = Trainer("team-a", "stuck", step="0+1x20 20x160", total_steps=constant(100),
                checkpoints="0x9 1x171", last_checkpoint="0x9 600x171")
# Checkpoints at 30m; the process restarts at 70m (counter back to 0, its start as the timestamp) and
# trains on: the old increase()-based rule fired here.
RESTARTED = Trainer("team-a", "restarted", step="0+1x69 30+1x111", total_steps=constant(1000),
                    checkpoints="0x29 1x39 0x111", last_checkpoint="0x29 1800x39 4200x111")
# All steps done, writing the model: no more checkpoints to expect.
FINISHED = Trainer("team-a", "finished", step="0+1x99 100x81", total_steps=constant(100),
                   checkpoints="0x49 1x131", last_checkpoint="0x49 3000x131")
# Still preparing data: no steps planned yet.
PREPARING = Trainer("team-a", "preparing", step=constant(0), total_steps=constant(0), checkpoints=constant(0),
                    last_checkpoint=constant(0))
STALE_CASES = {
    "stuck-trainer-fires-after-the-threshold": (STUCK, 71, 3660),
    "stuck-trainer-not-before-the-threshold": (STUCK, 69, None),
    "restarted-trainer-is-quiet": (RESTARTED, 100, None),
    "restarted-trainer-fires-once-stuck-for-the-threshold": (RESTARTED, 131, 3660),
    "finished-trainer-is-quiet": (FINISHED, 150, None),
    "preparing-trainer-is-quiet": (PREPARING, 120, None),
}


@pytest.mark.parametrize("trainer, eval_minute, age", STALE_CASES.values(), ids=list(STALE_CASES))
def test_checkpoint_stale_follows_the_trainers_own_clock(helm_cli, promtool, tmp_path, trainer, eval_minute, age):
    groups = rule_groups(helm_cli)
    expected = [] if age is None else [stale_alert(trainer, age)]
    run_promtool_test(promtool, tmp_path, groups, alert_test(
        "FineTuneJobCheckpointStale", eval_minute, trainer.series(), expected))


def test_checkpoint_stale_threshold_is_a_chart_value(helm_cli, promtool, tmp_path):
    groups = rule_groups(helm_cli, "--set", "monitoring.prometheusRule.checkpointStaleMinutes=30")
    run_promtool_test(promtool, tmp_path, groups, alert_test(
        "FineTuneJobCheckpointStale", 41, STUCK.series(), [stale_alert(STUCK, 1860)]))


# ---- FineTuneJobFailed -------------------------------------------------------------------------

def failed_alert(job: Job, age: int) -> dict:
    who = f"{job.namespace}/{job.name}"
    return job_alert("FineTuneJobFailed", job, f"FineTuneJob {who} failed",
                     f"FineTuneJob {who} failed {humanize_duration(age)} ago; kubectl -n {job.namespace} "
                     f"describe ftj {job.name} shows why (condition Failed).")


FAILED_A = Job("team-a", "broken", [(Phase.Running, 0), (Phase.Failed, 5)], heartbeat=0, completed=(300, 5))
FAILED_B = Job("team-b", "broken", [(Phase.Running, 0), (Phase.Failed, 20)], heartbeat=0, completed=(1200, 20))
SUCCEEDED = Job("team-a", "fine", [(Phase.Running, 0), (Phase.Succeeded, 5)], heartbeat=0, completed=(300, 5))
# Failed at 40m, run again (a new spec.runId) at 50m: the failure is no reason to alert any more.
RERUN = Job("team-c", "again", [(Phase.Running, 0), (Phase.Failed, 40), (Phase.Running, 50)], completed=(2400, 40))
FAILED_CASES = {
    "before-any-failure-it-is-quiet": (4, []),
    "a-failed-job-fires-with-its-own-namespace-and-name": (10, [FAILED_A]),
    "each-failed-job-fires-on-its-own": (45, [FAILED_A, FAILED_B, RERUN]),
    "a-job-run-again-is-quiet": (55, [FAILED_A, FAILED_B]),
    "the-failure-stops-firing-after-the-window": (66, [FAILED_B]),
    "an-old-failure-is-quiet": (100, []),
}


@pytest.mark.parametrize("eval_minute, firing", FAILED_CASES.values(), ids=list(FAILED_CASES))
def test_failed_fires_once_per_failed_job_with_its_namespace_and_name(helm_cli, promtool, tmp_path, eval_minute,
                                                                      firing):
    groups = rule_groups(helm_cli)
    jobs = [FAILED_A, FAILED_B, SUCCEEDED, RERUN]
    expected = [failed_alert(job, eval_minute * 60 - int(job.completed[0])) for job in firing]
    run_promtool_test(promtool, tmp_path, groups, alert_test(
        "FineTuneJobFailed", eval_minute, [s for job in jobs for s in job.series()], expected))


def test_failed_fires_once_whichever_operator_pod_exports_the_job(helm_cli, promtool, tmp_path):
    """One alert per failed run, not one per operator pod: the alert carries no target labels, so a new
    operator pod exporting the same job continues the alert instead of starting a second one."""
    run_promtool_test(promtool, tmp_path, rule_groups(helm_cli), alert_test(
        "FineTuneJobFailed", 10, FAILED_A.series() + replaced(FAILED_A).series(), [failed_alert(FAILED_A, 300)]))


def test_failed_window_is_a_chart_value(helm_cli, promtool, tmp_path):
    groups = rule_groups(helm_cli, "--set", "monitoring.prometheusRule.jobFailedWindowMinutes=120")
    run_promtool_test(promtool, tmp_path, groups, alert_test(
        "FineTuneJobFailed", 100, FAILED_A.series() + SUCCEEDED.series(), [failed_alert(FAILED_A, 5700)]))


# ---- FineTuneOperatorDown ----------------------------------------------------------------------

def operator_scrape_job(helm_cli, *args: str) -> tuple[str, str]:
    """(job, namespace) of the operator's targets: the Prometheus Operator names a ServiceMonitor's
    scrape job after the Service it selects, in the Service's namespace."""
    service = named(helm_cli.render(*MONITORING_ON, *args), "Service", "-metrics")
    return service["metadata"]["name"], service["metadata"]["namespace"]


def down_alert(job: str, namespace: str) -> dict:
    return {"exp_labels": {"severity": "critical", "job": job, "namespace": namespace},
            "exp_annotations": {
                "summary": "finetune-operator is down",
                "description": f"Prometheus cannot scrape the operator (job {job} in namespace {namespace}): "
                               "FineTuneJobs are not reconciled and their metrics are not updated.",
                "runbook_url": runbook_url("FineTuneOperatorDown")}}


DOWN_CASES = {  # up of the operator's target (None: no target at all), eval minute, fires
    "target-down-for-5m-fires": ("1x5 0x175", 12, True),
    "target-down-for-less-than-5m-is-quiet": ("1x5 0x175", 9, False),
    "target-absent-fires": (None, 10, True),
    "target-up-is-quiet": (constant(1), 30, False),
}


@pytest.mark.parametrize("release_args", [(), ("--set", "fullnameOverride=ftop")], ids=["default", "fullnameOverride"])
@pytest.mark.parametrize("up, eval_minute, fires", DOWN_CASES.values(), ids=list(DOWN_CASES))
def test_operator_down_fires_when_its_target_is_down_or_absent(helm_cli, promtool, tmp_path, release_args, up,
                                                              eval_minute, fires):
    job, namespace = operator_scrape_job(helm_cli, *release_args)
    groups = rule_groups(helm_cli, *release_args)
    # Other targets' up series, the trainers' and another operator's namespace, do not count.
    series = [{"series": 'up{job="finetune-system/ftop-finetune-operator-trainers", namespace="ftj-team-a-llama"}',
               "values": constant(1)},
              {"series": f'up{{job="{job}", namespace="elsewhere"}}', "values": constant(1)}]
    if up is not None:
        series.append({"series": f'up{{job="{job}", namespace="{namespace}", instance="10.0.0.5:8000"}}',
                       "values": up})
    expected = [down_alert(job, namespace)] if fires else []
    if fires and up is not None:
        expected[0]["exp_labels"]["instance"] = "10.0.0.5:8000"
    run_promtool_test(promtool, tmp_path, groups, alert_test("FineTuneOperatorDown", eval_minute, series, expected))


def test_operator_down_comes_with_the_service_monitor(helm_cli):
    alerts = alerts_of(rule_groups(helm_cli, "--set", "monitoring.serviceMonitor.enabled=false"))
    assert "FineTuneOperatorDown" not in alerts


# ---- FineTuneOperatorReconcileErrors -----------------------------------------------------------

@pytest.mark.parametrize("outcome, fires", [("error", True), ("ok", False)])
def test_reconcile_errors_fire_on_a_sustained_error_rate(helm_cli, promtool, tmp_path, outcome, fires):
    groups = rule_groups(helm_cli)
    series = [{"series": f'finetune_reconcile_total{{outcome="{outcome}"}}', "values": "0+5x180"}]
    expected = [{"exp_labels": {"severity": "critical"},
                 "exp_annotations": {"summary": "finetune-operator reconcile errors",
                                     "description": "The operator fails 5 reconcile passes per minute; read its logs.",
                                     "runbook_url": runbook_url("FineTuneOperatorReconcileErrors")}}] if fires else []
    run_promtool_test(promtool, tmp_path, groups, alert_test("FineTuneOperatorReconcileErrors", 30, series, expected))


# ---- every alert -------------------------------------------------------------------------------

def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    prose = re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S)
    for heading in re.findall(r"^#+ +(.+?) *$", prose, re.M):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return anchors


def test_the_chart_renders_every_alert(helm_cli):
    assert set(alerts_of(rule_groups(helm_cli))) == ALL_ALERTS


def test_every_alert_links_its_runbook_section_in_operations_md(helm_cli):
    anchors = github_anchors(OPERATIONS_MD.read_text())
    for name, alert in alerts_of(rule_groups(helm_cli)).items():
        url = alert["annotations"]["runbook_url"]
        assert url == runbook_url(name), url
        assert url.startswith(f"{DOCS}/operations.md#")
        assert url.split("#", 1)[1] in anchors, f"{name}: docs/operations.md has no heading {name}"


def test_runbook_base_url_is_a_chart_value(helm_cli):
    docs = "https://docs.example.com/finetune"
    alerts = alerts_of(rule_groups(helm_cli, "--set", f"monitoring.prometheusRule.docsBaseUrl={docs}/"))
    assert {alert["annotations"]["runbook_url"] for alert in alerts.values()} == {
        runbook_url(name, docs) for name in ALL_ALERTS}


def test_job_alerts_name_the_job_by_namespace_and_name(helm_cli):
    for name, alert in alerts_of(rule_groups(helm_cli)).items():
        if name in JOB_ALERTS:
            for text in (alert["annotations"]["summary"], alert["annotations"]["description"]):
                assert "$labels.namespace" in text and "$labels.name" in text, (name, text)
        assert alert["labels"]["severity"] in ("warning", "critical")


def test_alerts_query_only_metrics_the_operator_and_trainer_export(helm_cli):
    exported = exported_names()
    for name, alert in alerts_of(rule_groups(helm_cli)).items():
        used = metric_names_in(alert["expr"])
        assert used <= exported, f"{name} uses metrics nobody exports: {used - exported}"


@pytest.mark.parametrize("args", [
    (),
    ("--set", "config.progressStallSeconds=0"),
    ("--set-json", "config.progressStallSeconds=2500000.5",
     "--set", "monitoring.prometheusRule.jobFailedWindowMinutes=1440"),
    ("--set", "monitoring.serviceMonitor.enabled=false"),
], ids=["default", "no-stall-rule", "large-values", "no-service-monitor"])
def test_promtool_check_rules_passes(helm_cli, promtool, tmp_path, args):
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule_groups(helm_cli, *args)}))
    result = promtool_run(promtool, tmp_path, "check", "rules", "rules.yaml")
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr
