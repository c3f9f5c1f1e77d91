"""The operator's only door to the Kubernetes API: lightkube's async client, server-side apply.

Objects travel as plain dicts (what the builders return); this module maps a dict's apiVersion and
kind to its lightkube resource and applies it with the one field manager `finetune-operator`.
"""

from __future__ import annotations

from typing import Any, AsyncIterator

from lightkube import ApiError, AsyncClient
from lightkube.core import resource as lkr
from lightkube.generic_resource import Generic, create_global_resource, create_namespaced_resource
from lightkube.resources.core_v1 import (
    ConfigMap,
    Event,
    LimitRange,
    Namespace,
    Node,
    Pod,
    ResourceQuota,
    Secret,
    ServiceAccount,
)
from lightkube.resources.discovery_v1 import EndpointSlice
from lightkube.resources.networking_v1 import NetworkPolicy
from lightkube.types import CascadeType, PatchType

from finetune_operator.api import tenant
from finetune_operator.api import types as t
from finetune_operator.builders.names import MANAGER

FineTuneJob = create_namespaced_resource(t.GROUP, t.VERSION, t.KIND, t.PLURAL)
PyTorchJob = create_namespaced_resource("kubeflow.org", "v1", "PyTorchJob", "pytorchjobs")
TenantPolicy = create_global_resource(t.GROUP, t.VERSION, tenant.KIND, tenant.PLURAL)
KUEUE_API_VERSION = "kueue.x-k8s.io/v1beta2"
LocalQueue = create_namespaced_resource("kueue.x-k8s.io", "v1beta2", "LocalQueue", "localqueues")
Workload = create_namespaced_resource("kueue.x-k8s.io", "v1beta2", "Workload", "workloads")
# Generic, not lightkube's model: it exists in every lightkube-models release we may meet.
ServiceCIDR = create_global_resource("networking.k8s.io", "v1", "ServiceCIDR", "servicecidrs")
# Node addresses a sandbox must not reach (hostname-like types are no addresses).
NODE_ADDRESS_TYPES = ("InternalIP", "ExternalIP")



class PendingWorkloads(lkr.NamespacedSubResource, Generic):
    """Kueue's visibility API (an aggregated API served by Kueue): the pending Workloads of a LocalQueue with
    their positions, GET /apis/visibility.kueue.x-k8s.io/v1beta2/namespaces/<ns>/localqueues/<name>/pendingworkloads."""

    _api_info = lkr.ApiInfo(
        resource=lkr.ResourceDef("visibility.kueue.x-k8s.io", "v1beta2", "PendingWorkloadsSummary"),
        parent=lkr.ResourceDef("visibility.kueue.x-k8s.io", "v1beta2", "LocalQueue"),
        plural="localqueues", verbs=["get"], action="pendingworkloads")


RESOURCES: dict[tuple[str, str], Any] = {
    ("v1", "Namespace"): Namespace,
    ("v1", "ConfigMap"): ConfigMap,
    ("v1", "Secret"): Secret,
    ("v1", "ServiceAccount"): ServiceAccount,
    ("v1", "ResourceQuota"): ResourceQuota,
    ("v1", "LimitRange"): LimitRange,
    ("v1", "Pod"): Pod,
    ("v1", "Event"): Event,
    ("networking.k8s.io/v1", "NetworkPolicy"): NetworkPolicy,
    ("kubeflow.org/v1", "PyTorchJob"): PyTorchJob,
    (KUEUE_API_VERSION, "LocalQueue"): LocalQueue,
    (KUEUE_API_VERSION, "Workload"): Workload,
    (t.API_VERSION, t.KIND): FineTuneJob,
    (t.API_VERSION, tenant.KIND): TenantPolicy,
}


LIST_CHUNK = 500


def resource_of(obj: dict[str, Any]) -> Any:
    return RESOURCES[(obj["apiVersion"], obj["kind"])]


def as_dict(obj: Any) -> dict[str, Any]:
    return obj if isinstance(obj, dict) else obj.to_dict()


def is_not_found(exc: ApiError) -> bool:
    return exc.status.code == 404


def is_conflict(exc: ApiError) -> bool:
    return exc.status.code == 409


class Kube:
    """Thin async wrapper: get-or-None, list, server-side apply, delete-if-present."""

    def __init__(self, client: AsyncClient | None = None) -> None:
        self.client = client or AsyncClient(field_manager=MANAGER)

    async def close(self) -> None:
        await self.client.close()

    async def get(self, res: Any, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        try:
            if namespace is None:
                return as_dict(await self.client.get(res, name))
            return as_dict(await self.client.get(res, name, namespace=namespace))
        except ApiError as exc:
            if is_not_found(exc):
                return None
            raise

    async def api_server_endpoints(self) -> tuple[str, ...]:
        """The API server's own addresses: the EndpointSlice `kubernetes` in `default`, which the API
        server keeps and where kube-proxy leads the `kubernetes` Service."""
        endpoint_slice = await self.get(EndpointSlice, "kubernetes", "default")
        return tuple(address for endpoint in (endpoint_slice or {}).get("endpoints") or []
                     for address in endpoint.get("addresses") or [])

    async def service_cidrs(self) -> tuple[str, ...]:
        """The cluster's Service ranges: the ServiceCIDR objects (networking.k8s.io/v1, Kubernetes 1.33+;
        ApiError 404 on an older API server)."""
        return tuple([cidr async for item in self.client.list(ServiceCIDR, chunk_size=LIST_CHUNK)
                      for cidr in (as_dict(item).get("spec") or {}).get("cidrs") or []])

    async def node_networks(self) -> tuple[str, ...]:
        """Each node's pod ranges (spec.podCIDRs) and its internal and external addresses, read page by
        page and reduced to those strings (a Node object is large: its image list, its conditions)."""
        found: list[str] = []
        async for node in self.client.list(Node, chunk_size=LIST_CHUNK):
            found += (node.spec.podCIDRs or []) if node.spec else []
            found += [a.address for a in (node.status.addresses or []) if a.type in NODE_ADDRESS_TYPES] \
                if node.status else []
        return tuple(found)

    async def pending_workloads(self, namespace: str, local_queue: str) -> dict[str, Any]:
        """Kueue's PendingWorkloadsSummary of a LocalQueue (visibility API; ApiError 404 where it is not served)."""
        return as_dict(await self.client.get(PendingWorkloads, local_queue, namespace=namespace))

    async def list(self, res: Any, namespace: str, labels: dict[str, Any] | None = None,
                   fields: dict[str, str] | None = None) -> list[dict[str, Any]]:
        out = []
        iterator: AsyncIterator[Any] = self.client.list(res, namespace=namespace, labels=labels or {},
                                                        fields=fields or {})
        async for item in iterator:
            out.append(as_dict(item))
        return out

    async def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply of a whole object (force: the operator owns what it builds)."""
        meta = obj["metadata"]
        result = await self.client.patch(
            resource_of(obj), meta["name"], obj, namespace=meta.get("namespace"),
            patch_type=PatchType.APPLY, field_manager=MANAGER, force=True,
        )
        return as_dict(result)

    async def apply_status(self, namespace: str | None, name: str, status: dict[str, Any], kind: str = t.KIND) -> None:
        """Server-side apply of the status of a FineTuneJob (or, with kind, a cluster-scoped TenantPolicy)."""
        res = resource_of({"apiVersion": t.API_VERSION, "kind": kind})
        meta = {"name": name} if namespace is None else {"name": name, "namespace": namespace}
        body = {"apiVersion": t.API_VERSION, "kind": kind, "metadata": meta, "status": status}
        await self.client.patch(res.Status, name, body, namespace=namespace,
                                patch_type=PatchType.APPLY, field_manager=MANAGER, force=True)

    async def merge_patch(self, res: Any, name: str, namespace: str | None, patch: dict[str, Any]) -> None:
        await self.client.patch(res, name, patch, namespace=namespace, patch_type=PatchType.MERGE, field_manager=MANAGER)

    async def delete(self, res: Any, name: str, namespace: str | None = None, uid: str | None = None) -> bool:
        """Delete (background cascade); False when it was already gone, or (with `uid`, sent as the
        precondition) when the object of that name is another one now."""
        if uid is not None:
            return await self._delete_with_uid(res, name, namespace, uid)
        try:
            if namespace is None:
                await self.client.delete(res, name, cascade=CascadeType.BACKGROUND)
            else:
                await self.client.delete(res, name, namespace=namespace, cascade=CascadeType.BACKGROUND)
            return True
        except ApiError as exc:
            if is_not_found(exc):
                return False
            raise

    async def _delete_with_uid(self, res: Any, name: str, namespace: str | None, uid: str) -> bool:
        # lightkube's delete sends no body; DeleteOptions with preconditions go as the request body.
        generic = self.client._client
        request = generic.prepare_request("delete", res=res, name=name, namespace=namespace)
        request.data = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background",
                        "preconditions": {"uid": uid}}
        try:
            generic.handle_response("delete", await generic.send(generic.build_adapter_request(request)), request)
            return True
        except ApiError as exc:
            if is_not_found(exc) or is_conflict(exc):
                return False
            raise

    async def create(self, obj: dict[str, Any]) -> None:
        res = resource_of(obj)
        await self.client.create(res.from_dict(obj), namespace=obj["metadata"].get("namespace"))

    async def create_if_absent(self, obj: dict[str, Any]) -> bool:
        """Create-only (never adopts an existing object): False when the name is taken."""
        try:
            await self.create(obj)
            return True
        except ApiError as exc:
            if is_conflict(exc):
                return False
            raise
