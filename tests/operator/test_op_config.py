"""OperatorConfig: the development configuration loads, and bad configurations are refused by name."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from finetune_operator.__main__ import parse_args
from finetune_operator.config import OperatorConfig
from op_testdata import ROOT

DEV = ROOT / "operator" / "config" / "dev.yaml"


def test_dev_config_knows_the_local_pools():
    cfg = OperatorConfig.load(DEV)
    assert set(cfg.nodePools) == {"a100", "cpu", "local"}
    a100 = cfg.nodePools["a100"]
    assert a100.nodeSelector == {"finetune.dev/pool": "a100"} and a100.gpusPerNode == 8
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in a100.tolerations
    assert cfg.nodePools["cpu"].gpusPerNode == 0


@pytest.mark.parametrize("text,needle", [
    ("trainerImage: x\ndefaultNodePool: gpu\nnodePools: {cpu: {}}\n", "defaultNodePool 'gpu'"),
    ("defaultNodePool: cpu\nnodePools: {cpu: {}}\n", "trainerImage"),
    ("trainerImage: x\ndefaultNodePool: cpu\nnodePools: {cpu: {}}\nsandboxPrefix: Bad_Prefix\n", "sandboxPrefix"),
    ("trainerImage: x\ndefaultNodePool: cpu\nnodePools: {cpu: {gpus: 8}}\n", "gpus"),
])
def test_bad_configs_are_refused(text, needle):
    with pytest.raises(ValidationError, match=needle):
        OperatorConfig.from_yaml(text)


def test_command_line(monkeypatch):
    monkeypatch.setenv("FINETUNE_S3_ENDPOINT", "http://127.0.0.1:4566")
    args = parse_args(["--config", str(DEV), "--namespace", "team-a"])
    assert args.s3_endpoint == "http://127.0.0.1:4566" and args.namespace == ["team-a"]


def test_the_operator_identity_needs_no_password_database_entry(monkeypatch):
    # The chart runs the image as a numeric user that /etc/passwd does not know (kopf's default
    # identity asks for the user name and crashed the pod on the real node).
    import os
    import pwd
    import socket

    from finetune_operator.__main__ import operator_identity

    def unknown(uid):
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(pwd, "getpwuid", unknown)
    for name in ("LOGNAME", "USER", "LNAME", "USERNAME"):
        monkeypatch.delenv(name, raising=False)
    assert operator_identity() == f"{socket.gethostname()}/{os.getpid()}"
