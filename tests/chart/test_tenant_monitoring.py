"""Per-tenant monitoring in the chart: the budget alerts run through the real `promtool test rules`,
and the dashboard's Tenants row queries only the per-tenant metrics the operator exports."""

from __future__ import annotations

import json

import pytest

from finetune_operator.metrics import Metrics as OperatorMetrics
from tests.chart.chartkit import named
from tests.chart.promkit import MONITORING_ON, metric_names_in, rule_groups, run_promtool_test, runbook_url

TENANT_METRICS = {"finetune_tenant_jobs", "finetune_tenant_running_jobs", "finetune_tenant_gpus_in_use",
                  "finetune_tenant_gpu_seconds_total", "finetune_tenant_gpu_hours_used",
                  "finetune_tenant_gpu_hours_budget"}

# GPU-hours used and budget per tenant; team-d has no budget, so no budget gauge.
TENANT_USAGE = {"team-a": (85, 100), "team-b": (92, 100), "team-c": (100, 100), "team-d": (500, None)}
BUSY_GPUS = {"team-a": 2, "team-b": 4}


@pytest.fixture(scope="module")
def dashboard(helm_cli) -> dict:
    config_map = named(helm_cli.render(*MONITORING_ON), "ConfigMap", "-dashboard")
    return json.loads(config_map["data"]["finetune-operator.json"])


def row_panels(dashboard: dict, row_title: str) -> dict[str, dict]:
    """The panels of an expanded row: those after it up to the next row."""
    panels, in_row = {}, False
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            in_row = panel["title"] == row_title
        elif in_row:
            panels[panel["title"]] = panel
    return panels


def input_series() -> list[dict]:
    series = []
    for policy, (used, budget) in TENANT_USAGE.items():
        series.append({"series": f'finetune_tenant_gpu_hours_used{{policy="{policy}"}}', "values": f"{used}x15"})
        if budget is not None:
            series.append({"series": f'finetune_tenant_gpu_hours_budget{{policy="{policy}"}}',
                           "values": f"{budget}x15"})
    for policy, gpus in BUSY_GPUS.items():
        series.append({"series": f'finetune_tenant_gpu_seconds_total{{policy="{policy}"}}',
                       "values": f"0+{gpus * 60}x15"})
    return series


def budget_alert(alertname: str, *policies: str) -> dict:
    expected = []
    for policy in policies:
        used, budget = TENANT_USAGE[policy]
        percent = f"{100 * used / budget:g}%"
        if alertname == "FineTuneTenantBudgetNearlyUsed":
            summary = f"Tenant {policy} used {percent} of its GPU-hour budget"
            description = (f"TenantPolicy {policy} used {percent} of its GPU-hours this budget period; at 100 % its "
                           "new runs wait with reason BudgetExhausted until the next period or a larger budget.")
        else:
            summary = f"Tenant {policy} used its whole GPU-hour budget"
            description = (f"TenantPolicy {policy} used {percent} of its GPU-hours this budget period: its new runs "
                           "wait with reason BudgetExhausted until the next period or a larger budget; "
                           "running ones go on.")
        expected.append({"exp_labels": {"severity": "warning", "policy": policy},
                         "exp_annotations": {"summary": summary, "description": description,
                                             "runbook_url": runbook_url(alertname)}})
    return {"eval_time": "10m", "alertname": alertname, "exp_alerts": expected}


# ---- alerts ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("warning_ratio, nearly_used", [
    (None, ("team-b",)),
    ("0.8", ("team-a", "team-b")),
    ("0.95", ()),
], ids=["default-0.9", "ratio-0.8", "ratio-0.95"])
def test_budget_alerts_fire_per_tenant_by_share_of_budget_used(helm_cli, promtool, tmp_path, warning_ratio,
                                                               nearly_used):
    ratio_args = () if warning_ratio is None else (
        "--set-json", f"monitoring.prometheusRule.tenantBudgetWarningRatio={warning_ratio}")
    run_promtool_test(promtool, tmp_path, rule_groups(helm_cli, *ratio_args), {
        "input_series": input_series(),
        "alert_rule_test": [budget_alert("FineTuneTenantBudgetNearlyUsed", *nearly_used),
                            budget_alert("FineTuneTenantBudgetExhausted", "team-c")],
    })


@pytest.mark.parametrize("ratio", ["0", "1", "1.5"])
def test_budget_warning_ratio_must_lie_between_zero_and_one(helm_cli, ratio):
    result = helm_cli.template("--set", "monitoring.prometheusRule.enabled=true",
                               "--set-json", f"monitoring.prometheusRule.tenantBudgetWarningRatio={ratio}", check=False)
    assert result.returncode != 0 and "tenantBudgetWarningRatio" in result.stderr


# ---- dashboard -------------------------------------------------------------------------------------

TENANT_PANELS = {
    "Jobs by phase per tenant": {"finetune_tenant_jobs"},
    "GPUs in use per tenant": {"finetune_tenant_gpus_in_use"},
    "GPU-hours used of budget per tenant": {"finetune_tenant_gpu_hours_used", "finetune_tenant_gpu_hours_budget"},
    "GPUs busy per tenant (GPU-seconds per second)": {"finetune_tenant_gpu_seconds_total"},
}


def test_operator_exports_the_tenant_metrics():
    metrics = OperatorMetrics()
    metrics.observe_tenant("team-a", {"jobs": {"Running": 1}, "runningJobs": 1, "gpusInUse": 2,
                                      "usage": {"gpuSeconds": 3600}}, added_gpu_seconds=60, budget_gpu_hours=10)
    exported = {sample.name for family in metrics.registry.collect() for sample in family.samples}
    assert TENANT_METRICS <= exported


def test_dashboard_has_a_tenants_row_with_the_tenant_panels(dashboard):
    assert [p["title"] for p in dashboard["panels"] if p["type"] == "row"] == ["Tenants"]
    assert set(row_panels(dashboard, "Tenants")) == set(TENANT_PANELS)
    assert "policy" in {v["name"] for v in dashboard["templating"]["list"]}


@pytest.mark.parametrize("title, metrics", TENANT_PANELS.items(), ids=list(TENANT_PANELS))
def test_tenant_panel_queries_only_tenant_metrics(dashboard, title, metrics):
    panel = row_panels(dashboard, "Tenants")[title]
    exprs = [target["expr"] for target in panel["targets"]]
    assert exprs
    for expr in exprs:
        assert metric_names_in(expr) <= TENANT_METRICS, expr
        assert 'policy=~"$policy"' in expr, f"{title}: not filtered by the policy variable"
    assert set().union(*(metric_names_in(e) for e in exprs)) == metrics


def test_budget_and_busy_gpu_panels_evaluate_per_tenant(dashboard, promtool, tmp_path):
    panels = row_panels(dashboard, "Tenants")

    def query(title: str) -> str:
        (target,) = panels[title]["targets"]
        return target["expr"].replace("$policy", ".*")

    budget_percent = [{"labels": f'{{policy="{policy}"}}', "value": 100 * used / budget}
                      for policy, (used, budget) in TENANT_USAGE.items() if budget is not None]
    busy = [{"labels": f'{{policy="{policy}"}}', "value": gpus} for policy, gpus in BUSY_GPUS.items()]
    run_promtool_test(promtool, tmp_path, [], {
        "input_series": input_series(),
        "promql_expr_test": [
            {"expr": query("GPU-hours used of budget per tenant"), "eval_time": "10m", "exp_samples": budget_percent},
            {"expr": query("GPUs busy per tenant (GPU-seconds per second)"), "eval_time": "10m", "exp_samples": busy},
        ],
    })
