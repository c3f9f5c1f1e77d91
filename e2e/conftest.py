"""Fixtures of the control-plane tier: the local cluster (reused when already running), the operator
(one process per session), a fresh namespace per test, and a kubeconfig of an unprivileged tenant user."""

from __future__ import annotations

import json
import time
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml

from e2e.localcluster.cluster import TENANT_GROUP, LocalCluster
from e2e.localcluster.operator_release import OperatorRelease


def pytest_collection_modifyitems(config, items):
    """The cluster tier in three groups, each in collection order: the KWOK tier (mostly waiting: the unit tier
    runs beside it in `make test`), then real training (CPU-bound), then tests that measure times (`quiet`), when
    nothing else runs. Items outside e2e/ keep their place in front."""
    def group(item) -> int:
        if not item.nodeid.startswith("e2e/"):
            return 0
        return 3 if item.get_closest_marker("quiet") else 2 if item.get_closest_marker("e2e") else 1

    items[:] = sorted(items, key=group)


class Kube:
    """kubectl against the local cluster, as admin or as another kubeconfig's user."""

    def __init__(self, cluster: LocalCluster, kubeconfig: Path | None = None):
        self.cluster = cluster
        self.kubeconfig = kubeconfig or cluster.kubeconfig

    def run(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        result = self.cluster.kubectl(*args, kubeconfig=self.kubeconfig, input=input, check=False, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def apply(self, *objects: dict, namespace: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        args = ["apply", "--server-side", "--field-manager=e2e-tests", "-f", "-"]
        if namespace:
            args += ["-n", namespace]
        return self.run(*args, input=yaml.safe_dump_all(objects), check=check)

    def get(self, kind: str, name: str | None = None, namespace: str | None = None, selector: str | None = None) -> dict:
        args = ["get", kind] + ([name] if name else []) + ["-o", "json"]
        if namespace:
            args += ["-n", namespace]
        if selector:
            args += ["-l", selector]
        return json.loads(self.run(*args).stdout)

    def as_user(self, kubeconfig: Path) -> "Kube":
        return Kube(self.cluster, kubeconfig)


@pytest.fixture(scope="session")
def local_cluster():
    cluster = LocalCluster()
    started_here = not cluster.is_running()
    cluster.up()
    yield cluster
    if started_here:
        cluster.down()


@pytest.fixture(scope="session")
def operator(local_cluster) -> OperatorRelease:
    """The operator installed by its Helm chart (its image, service account, RBAC, admission guard),
    one release for the session; an installation from an earlier run is upgraded to this tree."""
    release = OperatorRelease(local_cluster)
    release.up()
    yield release
    # Let the finalizers of jobs in deleted test namespaces run before the operator goes.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and local_cluster.kubectl(
            "get", "finetunejobs", "-A", "-o", "name", check=False).stdout.strip():
        time.sleep(2)
    release.down()


@pytest.fixture(scope="session")
def kube(local_cluster) -> Kube:
    return Kube(local_cluster)


@pytest.fixture(scope="session")
def tenant_kubeconfig(local_cluster) -> Path:
    """Kubeconfig of `tenant-alice` (group finetune:tenants): edit rights only in test namespaces."""
    return local_cluster.tenant_kubeconfig


def make_namespace(kube: Kube, label: str) -> str:
    """A fresh namespace named after label, where tenant users have the built-in `edit` role."""
    name = f"t-{label[:30].lower().replace('_', '-').strip('-')}-{uuid.uuid4().hex[:6]}"
    name = "".join(c for c in name if c.isalnum() or c == "-")
    kube.apply(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": {"finetune.dev/test": "true"}}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "tenant-edit", "namespace": name},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": TENANT_GROUP}]},
    )
    return name


@pytest.fixture
def namespace(kube, request) -> str:
    """A fresh namespace for one test."""
    name = make_namespace(kube, request.node.name)
    yield name
    kube.run("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def suffix() -> str:
    """A suffix unique to one test, for the names of cluster-scoped objects it makes."""
    return uuid.uuid4().hex[:6]


@pytest.fixture
def cluster_objects(kube):
    """Applies cluster-scoped objects (policies, Kueue flavors and queues, PriorityClasses) for one
    test and deletes them after it (namespaced ones go with the test's namespace)."""
    made: list[dict] = []

    def apply(*objects: dict) -> None:
        made.extend(objects)
        kube.apply(*objects)

    yield apply
    for obj in reversed(made):
        group = obj["apiVersion"].rpartition("/")[0]
        resource = f"{obj['kind'].lower()}" + (f".{group}" if group else "")
        kube.run("delete", resource, obj["metadata"]["name"], "--wait=false", "--ignore-not-found", check=False)
