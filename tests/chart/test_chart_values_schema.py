"""values.schema.json: helm refuses misspelled keys and wrong types at every level, and accepts
the documented shapes."""

from __future__ import annotations

import json

import pytest

from finetune_operator.config import NodePool, OperatorConfig, S3Egress
from tests.chart.chartkit import CHART, named

BAD_VALUES = [
    # (helm --set flag, value, what helm's schema error names)
    ("--set", "imagee.tag=1.0", "additional properties 'imagee' not allowed"),
    ("--set", "replicaCount=2", "additional properties 'replicaCount' not allowed"),
    ("--set", "config.trainerImg=x", "additional properties 'trainerImg' not allowed"),
    ("--set", "config.nodePools.gpu.nodeSelecter.pool=gpu", "additional properties 'nodeSelecter' not allowed"),
    ("--set", "config.nodePools.gpu.tolerations[0].efect=NoSchedule", "additional properties 'efect' not allowed"),
    ("--set", "monitoring.prometheusRule.enabeld=true", "additional properties 'enabeld' not allowed"),
    ("--set", "serviceAccount.annotation.a=b", "additional properties 'annotation' not allowed"),
    ("--set-string", "config.livenessPort=8080", "got string, want integer"),
    ("--set-string", "rbac.create=true", "got string, want boolean"),
    ("--set", "config.operatorMetricsPort=70000", "maximum"),
    ("--set", "config.gpusPerNode=8", "additional properties 'gpusPerNode' not allowed"),
    ("--set", "config.nodePools.gpu.gpusPerNode=-1", "minimum"),
    ("--set", "image.pullPolicy=Sometimes", "value must be one of"),
    ("--set", "monitoring.serviceMonitor.interval=30", "got number, want string"),
    ("--set-string", "monitoring.serviceMonitor.interval=thirty", "does not match pattern"),
    ("--set", "config.sandboxPrefix=Finetune_Jobs", "does not match pattern"),
    ("--set", "config.s3Endpoint=minio:9000", "does not match pattern"),
    ("--set", "watchNamespaces[0]=Team_A", "does not match pattern"),
    ("--set", "command=null", "missing property 'command'"),
    ("--set", "command=python", "got string, want array"),
    ("--set", "probes.liveness.periodSeconds=0", "minimum"),
    ("--set", "config.nodePools=null", "missing property 'nodePools'"),
    ("--set", "resources.requests=1", "got number, want object"),
]


@pytest.mark.parametrize("flag, value, error", BAD_VALUES, ids=[v for _, v, _ in BAD_VALUES])
def test_schema_rejects_misspelled_keys_and_wrong_types(helm_cli, flag, value, error):
    result = helm_cli.template(flag, value, check=False)
    assert result.returncode != 0, f"{value} was accepted"
    assert "values don't meet the specifications of the schema" in result.stderr
    assert error in result.stderr, result.stderr


GOOD_VALUES = [
    "image.tag=0.2.0",
    "watchNamespaces={team-a,team-b}",
    "config.s3Endpoint=http://127.0.0.1:9000",
    "config.nodePools.local.nodeSelector.finetune\\.dev/pool=local",
    "resources.limits.cpu=2",
    "monitoring.prometheusRule.enabled=true",
    "admissionGuard.enabled=false",
    "serviceAccount.create=false,serviceAccount.name=existing-sa",
]


@pytest.mark.parametrize("value", GOOD_VALUES)
def test_schema_accepts_documented_values(helm_cli, value):
    assert helm_cli.template("--set", value).returncode == 0


def test_default_node_pool_must_be_configured_for_the_operator_to_start(helm_cli):
    """The schema cannot cross-check keys; the operator's own config model does (test_chart_render checks
    the rendered config against it), and helm renders whatever pool is named."""
    objects = helm_cli.render("--set", "config.defaultNodePool=cpu")
    config_map = named(objects, "ConfigMap", "-config")
    assert "defaultNodePool: cpu" in config_map["data"]["config.yaml"]


SCHEMA = json.loads((CHART / "values.schema.json").read_text())


@pytest.mark.parametrize("schema_path, model", [
    (("config",), OperatorConfig),
    (("config", "nodePools", "*"), NodePool),
    (("config", "s3Egress"), S3Egress),
], ids=["OperatorConfig", "NodePool", "S3Egress"])
def test_config_schema_has_exactly_the_operator_config_fields(schema_path, model):
    """A field added to (or removed from) the operator's config must reach the chart's schema."""
    node = SCHEMA
    for key in schema_path:
        node = node["additionalProperties"] if key == "*" else node["properties"][key]
    assert node["additionalProperties"] is False
    assert set(node["properties"]) == set(model.model_fields)
    assert set(node.get("required", [])) == {name for name, f in model.model_fields.items() if f.is_required()}
