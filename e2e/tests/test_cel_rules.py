"""The CRD's CEL rules in the real kube-apiserver: every row of tests/operator/cel_cases.py (the table the
operator's Python validators are checked against) is created with --dry-run=server, and the API server
accepts exactly the rows the table says it does."""

from __future__ import annotations

import json
import re
import sys

import pytest

from e2e.localcluster.operator_release import install_crds
from e2e.localcluster.paths import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "tests" / "operator"))
from cel_cases import CEL_CASES  # noqa: E402

pytestmark = pytest.mark.cluster

CREATED = re.compile(r"^finetunejob\.finetune\.dev/(cel-\d+) created \(server dry run\)$")


def test_the_api_server_accepts_exactly_the_rows_the_table_accepts(local_cluster, kube):
    install_crds(local_cluster)
    jobs = [{"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": f"cel-{i}"},
             "spec": spec} for i, (_, spec, _) in enumerate(CEL_CASES)]
    # One request per object, one kubectl for all: it goes on after an object is refused. JSON, not YAML: kubectl
    # reads YAML 1.1, where a string such as y is a boolean.
    done = kube.run("create", "--dry-run=server", "-n", "default", "-f", "-",
                    input=json.dumps({"apiVersion": "v1", "kind": "List", "items": jobs}), check=False, timeout=300)
    created = {m.group(1) for line in done.stdout.splitlines() if (m := CREATED.match(line.strip()))}
    wrong = [(name, "accepted" if f"cel-{i}" in created else "refused",
              [line for line in done.stderr.splitlines() if f'"cel-{i}"' in line])
             for i, (name, _, accepted) in enumerate(CEL_CASES) if (f"cel-{i}" in created) != accepted]
    assert not wrong, wrong
    # refused by validation, not for another reason (a missing namespace, a dropped connection)
    invalid = {m.group(1) for m in re.finditer(r'FineTuneJob\.finetune\.dev "(cel-\d+)" is invalid', done.stderr)}
    assert invalid == {f"cel-{i}" for i, (_, _, accepted) in enumerate(CEL_CASES) if not accepted}, done.stderr[-3000:]
