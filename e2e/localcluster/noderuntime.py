"""A local node runtime: Node objects of the pool `local` whose pods run as local processes.

KWOK only pretends that pods run. This runtime makes them run for real on this machine, without a
container runtime, so the whole chain (FineTuneJob -> operator -> PyTorchJob -> pods -> torchrun ->
trainer) can be shown end to end. What it does for each pod bound to one of its nodes:

- runs each container's command and args as a process (the image is not used: the process runs in
  this checkout's environment, with the virtualenv's bin/ first on PATH);
- env: value, valueFrom (secretKeyRef, configMapKeyRef, fieldRef) and envFrom (Secret, ConfigMap);
- ConfigMap, Secret, emptyDir and projected volumes become folders under
  `.cluster/pods/<namespace>/<pod>/volumes/<volume>/`; a container's mountPath appearing in its
  command, args or env values is rewritten to that folder (the `per-pod path`);
- names of Services and pods in the pod's namespace, as values of `*_ADDR` / `*_HOST` env vars,
  resolve to 127.0.0.1 (MASTER_ADDR of a PyTorchJob, for one); ports: a `*MASTER_PORT` value gets
  a free host port shared by all pods of the job, a `*_PORT` value naming a declared containerPort
  a free host port of the pod's own, so concurrent jobs never clash; a port named `metrics` is
  registered as a Prometheus target of the local cluster;
- in-cluster API access: KUBERNETES_SERVICE_HOST/PORT point at the local API server; a projected
  service-account token (what the ServiceAccount admission plugin mounts) is requested with the
  TokenRequest API, bound to the pod, written into the volume folder and also handed over as a
  kubeconfig in KUBECONFIG, because clients read the token from its absolute path otherwise;
- reports status honestly: Pending, Running, Succeeded or Failed with the real exit code;
  restartPolicy OnFailure/Always restarts the process and counts restarts;
- deleting a pod sends SIGTERM to its processes and SIGKILL after the grace period, then removes it;
- output of each container is kept in `.cluster/pods/<namespace>/<pod>/<container>.log`
  (`python -m e2e.localcluster logs <namespace> <pod>` prints it).

It is level-based: every second it lists the pods bound to its nodes and moves each toward the
state its spec asks for, so a restart of the runtime picks up where it was.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from lightkube import Client, KubeConfig
from lightkube.core.exceptions import ApiError
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.models.authentication_v1 import BoundObjectReference, TokenRequestSpec
from lightkube.resources.core_v1 import ConfigMap, Node, Pod, Secret, Service, ServiceAccount
from lightkube.types import PatchType
import yaml

from .nodes import POOL_LABEL
from .procs import free_port

log = logging.getLogger("noderuntime")

POOL = "local"
FIELD_MANAGER = "finetune-local-runtime"
HEARTBEAT_SECONDS = 10


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def node_object(name: str, cpu: int, memory_bytes: int) -> dict:
    capacity = {"cpu": str(cpu), "memory": str(memory_bytes), "pods": "32", "ephemeral-storage": "100Gi"}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {
            POOL_LABEL: POOL, "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64", "node.kubernetes.io/instance-type": "local-process"}},
        "spec": {},
        "status": {"capacity": capacity, "allocatable": capacity},
    }


def node_status(cpu: int, memory_bytes: int, started: str) -> dict:
    now = _now()
    capacity = {"cpu": str(cpu), "memory": str(memory_bytes), "pods": "32", "ephemeral-storage": "100Gi"}
    conditions = [
        ("Ready", "True", "LocalRuntimeReady", "the local node runtime is running"),
        ("MemoryPressure", "False", "LocalRuntimeHasSufficientMemory", ""),
        ("DiskPressure", "False", "LocalRuntimeHasNoDiskPressure", ""),
        ("PIDPressure", "False", "LocalRuntimeHasSufficientPID", ""),
    ]
    return {"status": {
        "capacity": capacity, "allocatable": capacity,
        "conditions": [{"type": t, "status": s, "reason": r, "message": m, "lastHeartbeatTime": now,
                        "lastTransitionTime": started} for t, s, r, m in conditions],
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
        "nodeInfo": {"architecture": "amd64", "operatingSystem": "linux", "kubeletVersion": "local-runtime",
                     "kubeProxyVersion": "local-runtime", "containerRuntimeVersion": "local-process://1",
                     "bootID": "", "kernelVersion": os.uname().release, "machineID": "", "osImage": "local",
                     "systemUUID": ""},
    }}


@dataclass
class ContainerRun:
    name: str
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    restarts: int = 0
    exit_code: int | None = None
    started_at: str = ""
    finished_at: str = ""


@dataclass
class PodRun:
    namespace: str
    name: str
    uid: str
    directory: Path
    restart_policy: str
    containers: list[ContainerRun] = field(default_factory=list)
    init_containers: list[ContainerRun] = field(default_factory=list)
    pod_ip: str = ""
    terminating_since: float | None = None
    reported: str = ""
    prometheus_target: Path | None = None


class PortMap:
    """Host ports for in-pod ports, stable per (namespace, owner, port): the owner is the job for
    ports all its pods must agree on (the rendezvous), the pod for its own ports."""

    def __init__(self):
        self._ports: dict[tuple[str, str, str], int] = {}

    def get(self, namespace: str, owner: str, port: str) -> int:
        key = (namespace, owner, port)
        if key not in self._ports:
            self._ports[key] = free_port()
        return self._ports[key]


def _job_of(pod: dict) -> str:
    labels = pod["metadata"].get("labels") or {}
    return labels.get("training.kubeflow.org/job-name") or labels.get("job-name") or pod["metadata"]["name"]


class LocalNodeRuntime:
    def __init__(self, kubeconfig: Path, root: Path, node_names: list[str], prometheus_targets: Path | None = None):
        self.client = Client(KubeConfig.from_file(str(kubeconfig)), field_manager=FIELD_MANAGER)
        self.root = root
        self.node_names = node_names
        self.prometheus_targets = prometheus_targets
        self.runs: dict[str, PodRun] = {}  # by pod uid
        self.ports = PortMap()
        self.cpu = os.cpu_count() or 2
        self.memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        self.started = _now()
        self._last_heartbeat = 0.0
        self.venv_bin = Path(sys.executable).parent
        self.kubeconfig_doc = yaml.safe_load(Path(kubeconfig).read_text())
        server = self.kubeconfig_doc["clusters"][0]["cluster"]["server"]
        self.api_host, self.api_port = server.removeprefix("https://").rsplit(":", 1)
        self.ca_file = self.kubeconfig_doc["clusters"][0]["cluster"]["certificate-authority"]

    # ---- node --------------------------------------------------------------------------------

    def register_nodes(self) -> None:
        for name in self.node_names:
            self.client.apply(Node.from_dict(node_object(name, self.cpu, self.memory)), force=True)
        self.heartbeat()

    def heartbeat(self) -> None:
        for name in self.node_names:
            self.client.patch(Node.Status, name, node_status(self.cpu, self.memory, self.started),
                              patch_type=PatchType.MERGE)
        self._last_heartbeat = time.monotonic()

    # ---- the loop ----------------------------------------------------------------------------

    def run_forever(self) -> None:
        self.register_nodes()
        stop = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
        signal.signal(signal.SIGINT, lambda *_: stop.append(True))
        while not stop:
            try:
                self.sync_once()
            except Exception:  # a bad pod or a hiccup of the API server must not stop the node
                log.exception("sync failed")
            time.sleep(1)
        for run in list(self.runs.values()):
            self._kill(run, grace=5)

    def sync_once(self) -> None:
        if time.monotonic() - self._last_heartbeat > HEARTBEAT_SECONDS:
            self.heartbeat()
        seen: set[str] = set()
        for node_name in self.node_names:
            for pod_obj in self.client.list(Pod, namespace="*", fields={"spec.nodeName": node_name}):
                pod = pod_obj.to_dict()
                uid = pod["metadata"]["uid"]
                seen.add(uid)
                try:
                    self._sync_pod(pod)
                except Exception as exc:  # noqa: BLE001 - report on the pod, keep the node alive
                    log.exception("pod %s/%s", pod["metadata"]["namespace"], pod["metadata"]["name"])
                    self._fail_before_start(pod, "RuntimeError", str(exc))
        for uid in [u for u in self.runs if u not in seen]:
            run = self.runs.pop(uid)
            self._kill(run, grace=0)
            self._cleanup(run)

    def _sync_pod(self, pod: dict) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        run = self.runs.get(uid)
        if meta.get("deletionTimestamp"):
            if run is None:
                self._force_delete(pod)
                return
            if run.terminating_since is None:
                run.terminating_since = time.monotonic()
                self._signal(run, signal.SIGTERM)
            grace = pod["spec"].get("terminationGracePeriodSeconds", 30) or 0
            if self._all_exited(run) or time.monotonic() - run.terminating_since > grace:
                self._kill(run, grace=0)
                self._cleanup(run)
                self.runs.pop(uid, None)
                self._force_delete(pod)
            return
        phase = (pod.get("status") or {}).get("phase")
        if run is None:
            if phase in ("Succeeded", "Failed"):
                return  # finished before a restart of this runtime
            run = self._prepare(pod)
            self.runs[uid] = run
        self._advance(run)
        self._report(pod, run)

    def _advance(self, run: PodRun) -> None:
        """Init containers one after the other, each to success; then all containers at once."""
        for init in run.init_containers:
            if init.proc is None:
                self._start(run, init)
                return
            if init.exit_code is None:
                code = init.proc.poll()
                if code is None:
                    return
                init.exit_code, init.finished_at = (code if code >= 0 else 128 - code), _now()
            if init.exit_code != 0:
                if run.restart_policy == "Never":
                    return
                init.restarts += 1
                self._start(run, init)
                return
        for container in run.containers:
            if container.proc is None:
                self._start(run, container)
        self._poll(run)

    # ---- preparing a pod ---------------------------------------------------------------------

    def _prepare(self, pod: dict) -> PodRun:
        meta, spec = pod["metadata"], pod["spec"]
        namespace, name = meta["namespace"], meta["name"]
        directory = self.root / namespace / name
        shutil.rmtree(directory, ignore_errors=True)
        (directory / "volumes").mkdir(parents=True)
        volume_dirs = self._materialise_volumes(pod, spec.get("volumes") or [], directory / "volumes")
        local_names = self._local_names(namespace)
        job = _job_of(pod)
        run = PodRun(namespace, name, meta["uid"], directory, spec.get("restartPolicy", "Always"),
                     pod_ip=self._next_pod_ip())
        for kind, target in (("initContainers", run.init_containers), ("containers", run.containers)):
            for container in spec.get(kind) or []:
                mounts = {m["mountPath"]: volume_dirs[m["name"]] for m in container.get("volumeMounts") or []
                          if m["name"] in volume_dirs}
                env = self._container_env(pod, container, local_names, job, mounts)
                argv = [_rewrite_paths(_rewrite_hosts(a, local_names), mounts)
                        for a in (container.get("command") or []) + (container.get("args") or [])]
                if not argv:
                    raise ValueError(f"container {container['name']}: no command (images are not run locally)")
                target.append(ContainerRun(container["name"], argv, env))
                if kind == "containers":
                    self._register_metrics(run, container, namespace, job, pod)
        return run

    def _next_pod_ip(self) -> str:
        # Endpoints may not hold loopback addresses: report a unique address from a range of our
        # own; the processes themselves talk over loopback.
        self._pod_counter = getattr(self, "_pod_counter", 0) + 1
        return f"10.245.{(self._pod_counter >> 8) & 255}.{self._pod_counter & 255 or 1}"

    def _materialise_volumes(self, pod: dict, volumes: list[dict], base: Path) -> dict[str, Path]:
        namespace = pod["metadata"]["namespace"]
        dirs = {}
        for volume in volumes:
            target = base / volume["name"]
            target.mkdir(parents=True, exist_ok=True)
            if "configMap" in volume:
                cm = self.client.get(ConfigMap, volume["configMap"]["name"], namespace=namespace).to_dict()
                for key, value in (cm.get("data") or {}).items():
                    (target / key).write_text(value)
                for key, value in (cm.get("binaryData") or {}).items():
                    (target / key).write_bytes(base64.b64decode(value))
            elif "secret" in volume:
                secret = self.client.get(Secret, volume["secret"]["secretName"], namespace=namespace).to_dict()
                for key, value in (secret.get("data") or {}).items():
                    path = target / key
                    path.write_bytes(base64.b64decode(value))
                    path.chmod(0o600)
            elif "projected" in volume:
                self._materialise_projected(pod, volume["projected"], target)
            dirs[volume["name"]] = target
        return dirs

    def _materialise_projected(self, pod: dict, projected: dict, target: Path) -> None:
        namespace = pod["metadata"]["namespace"]
        for source in projected.get("sources") or []:
            if "serviceAccountToken" in source:
                token = self._service_account_token(pod, source["serviceAccountToken"])
                (target / source["serviceAccountToken"]["path"]).write_text(token)
                self._write_in_cluster_kubeconfig(pod, token)
            elif "configMap" in source:
                data = self.client.get(ConfigMap, source["configMap"]["name"], namespace=namespace).to_dict().get("data") or {}
                for item in source["configMap"].get("items") or [{"key": k, "path": k} for k in data]:
                    (target / item["path"]).write_text(data[item["key"]])
            elif "downwardAPI" in source:
                for item in source["downwardAPI"].get("items") or []:
                    if "fieldRef" in item:
                        (target / item["path"]).write_text(_field_ref(pod, item["fieldRef"]["fieldPath"]))
            elif "secret" in source:
                data = self.client.get(Secret, source["secret"]["name"], namespace=namespace).to_dict().get("data") or {}
                for key, value in data.items():
                    (target / key).write_bytes(base64.b64decode(value))

    def _service_account_token(self, pod: dict, source: dict) -> str:
        meta = pod["metadata"]
        spec = TokenRequestSpec(
            audiences=[source["audience"]] if source.get("audience") else [],
            expirationSeconds=max(int(source.get("expirationSeconds", 3607)), 3600),
            boundObjectRef=BoundObjectReference(apiVersion="v1", kind="Pod", name=meta["name"], uid=meta["uid"]),
        )
        sa_name = pod["spec"].get("serviceAccountName") or "default"
        request = ServiceAccount.Token(metadata=ObjectMeta(name=sa_name, namespace=meta["namespace"]), spec=spec)
        result = self.client.create(request, sa_name, namespace=meta["namespace"])
        return result.status.token

    def _write_in_cluster_kubeconfig(self, pod: dict, token: str) -> None:
        namespace = pod["metadata"]["namespace"]
        config = {
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "in-cluster", "cluster": {"server": f"https://{self.api_host}:{self.api_port}",
                                                            "certificate-authority": self.ca_file}}],
            "users": [{"name": "service-account", "user": {"token": token}}],
            "contexts": [{"name": "in-cluster", "context": {"cluster": "in-cluster", "user": "service-account",
                                                            "namespace": namespace}}],
            "current-context": "in-cluster",
        }
        path = self.root / namespace / pod["metadata"]["name"] / "in-cluster.kubeconfig"
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)

    def _local_names(self, namespace: str) -> set[str]:
        names = {s.metadata.name for s in self.client.list(Service, namespace=namespace)}
        names |= {p.metadata.name for p in self.client.list(Pod, namespace=namespace)}
        return names | {f"{n}.{namespace}" for n in names} | {f"{n}.{namespace}.svc" for n in names} | {
            f"{n}.{namespace}.svc.cluster.local" for n in names}

    def _container_env(self, pod: dict, container: dict, local_names: set[str], job: str,
                       mounts: dict[str, Path]) -> dict[str, str]:
        namespace = pod["metadata"]["namespace"]
        env: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "secretRef" in source:
                data = self.client.get(Secret, source["secretRef"]["name"], namespace=namespace).to_dict().get("data") or {}
                env.update({prefix + k: base64.b64decode(v).decode() for k, v in data.items()})
            if "configMapRef" in source:
                data = self.client.get(ConfigMap, source["configMapRef"]["name"], namespace=namespace).to_dict().get("data") or {}
                env.update({prefix + k: v for k, v in data.items()})
        for item in container.get("env") or []:
            env[item["name"]] = self._env_value(pod, item)
        declared_ports = {str(p["containerPort"]) for p in container.get("ports") or []}
        for key, value in list(env.items()):
            if key.endswith(("_ADDR", "_HOST")) and value in local_names:
                env[key] = "127.0.0.1"
            elif key.endswith("MASTER_PORT"):  # shared by all pods of the job
                env[key] = str(self.ports.get(namespace, job, value))
            elif key.endswith("_PORT") and value in declared_ports:  # this pod's own port
                env[key] = str(self.ports.get(namespace, pod["metadata"]["name"], value))
            else:
                env[key] = _rewrite_paths(value, mounts)
        base = {k: v for k, v in os.environ.items() if k in ("HOME", "LANG", "LC_ALL", "TMPDIR", "TERM")}
        base["PATH"] = f"{self.venv_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}"
        base["PYTHONUNBUFFERED"] = "1"
        base["HOSTNAME"] = pod["metadata"]["name"]
        base["KUBERNETES_SERVICE_HOST"] = self.api_host
        base["KUBERNETES_SERVICE_PORT"] = self.api_port
        in_cluster = self.root / namespace / pod["metadata"]["name"] / "in-cluster.kubeconfig"
        if in_cluster.exists():
            base["KUBECONFIG"] = str(in_cluster)
        return {**base, **env}

    def _env_value(self, pod: dict, item: dict) -> str:
        if "value" in item:
            return item["value"]
        source = item.get("valueFrom") or {}
        namespace = pod["metadata"]["namespace"]
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            data = self.client.get(Secret, ref["name"], namespace=namespace).to_dict().get("data") or {}
            return base64.b64decode(data[ref["key"]]).decode()
        if "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            return (self.client.get(ConfigMap, ref["name"], namespace=namespace).to_dict().get("data") or {})[ref["key"]]
        if "fieldRef" in source:
            return _field_ref(pod, source["fieldRef"]["fieldPath"])
        if "resourceFieldRef" in source:
            return ""
        return ""

    def _register_metrics(self, run: PodRun, container: dict, namespace: str, job: str, pod: dict) -> None:
        if not self.prometheus_targets:
            return
        for port in container.get("ports") or []:
            if port.get("name") == "metrics":
                host_port = self.ports.get(namespace, run.name, str(port["containerPort"]))
                target = self.prometheus_targets / f"pod-{namespace}-{run.name}.json"
                labels = {"namespace": namespace, "pod": run.name, "source": "local-runtime"}
                labels.update({k.replace(".", "_").replace("/", "_").replace("-", "_"): v
                               for k, v in (pod["metadata"].get("labels") or {}).items()})
                target.write_text(json.dumps([{"targets": [f"127.0.0.1:{host_port}"], "labels": labels}]))
                run.prometheus_target = target

    # ---- processes ---------------------------------------------------------------------------

    def _start(self, run: PodRun, container: ContainerRun) -> None:
        log_file = run.directory / f"{container.name}.log"
        with open(log_file, "ab") as out:
            container.proc = subprocess.Popen(
                container.argv, env=container.env, cwd=run.directory, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        container.exit_code = None
        container.started_at = _now()
        log.info("started %s/%s[%s] pid %s: %s", run.namespace, run.name, container.name, container.proc.pid,
                 " ".join(container.argv))

    def _poll(self, run: PodRun) -> None:
        for container in run.containers:
            if container.proc is None or container.exit_code is not None:
                continue
            code = container.proc.poll()
            if code is None:
                continue
            container.exit_code = code if code >= 0 else 128 - code  # killed by signal N -> 128+N
            container.finished_at = _now()
            restart = run.restart_policy == "Always" or (run.restart_policy == "OnFailure" and container.exit_code != 0)
            if restart and run.terminating_since is None:
                container.restarts += 1
                self._start(run, container)

    def _all_exited(self, run: PodRun) -> bool:
        return all(c.proc is None or c.proc.poll() is not None for c in run.init_containers + run.containers)

    def _signal(self, run: PodRun, sig: int) -> None:
        for container in run.init_containers + run.containers:
            if container.proc and container.proc.poll() is None:
                try:
                    os.killpg(container.proc.pid, sig)
                except ProcessLookupError:
                    pass

    def _kill(self, run: PodRun, grace: float) -> None:
        self._signal(run, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and not self._all_exited(run):
            time.sleep(0.1)
        self._signal(run, signal.SIGKILL)
        for container in run.init_containers + run.containers:
            if container.proc:
                try:
                    container.proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass

    def _cleanup(self, run: PodRun) -> None:
        if run.prometheus_target:
            run.prometheus_target.unlink(missing_ok=True)

    # ---- status ------------------------------------------------------------------------------

    def _report(self, pod: dict, run: PodRun) -> None:
        status = pod_status(run)
        fingerprint = json.dumps(status, sort_keys=True, default=str)
        if fingerprint == run.reported:
            return
        self.client.patch(Pod.Status, run.name, {"status": status}, namespace=run.namespace,
                          patch_type=PatchType.MERGE)
        run.reported = fingerprint
        if status["phase"] in ("Succeeded", "Failed"):
            self._cleanup(run)

    def _fail_before_start(self, pod: dict, reason: str, message: str) -> None:
        if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            return
        try:
            self.client.patch(Pod.Status, pod["metadata"]["name"], {"status": {
                "phase": "Failed", "reason": reason, "message": message[:1000]}},
                namespace=pod["metadata"]["namespace"], patch_type=PatchType.MERGE)
        except ApiError:
            log.exception("could not report the failure")

    def _force_delete(self, pod: dict) -> None:
        try:
            self.client.delete(Pod, pod["metadata"]["name"], namespace=pod["metadata"]["namespace"], grace_period=0)
        except ApiError as exc:
            if exc.status.code != 404:
                raise


def _container_statuses(containers: list[ContainerRun]) -> list[dict]:
    statuses = []
    for c in containers:
        running = c.proc is not None and c.exit_code is None
        if running:
            state = {"running": {"startedAt": c.started_at}}
        elif c.exit_code is not None:
            state = {"terminated": {"exitCode": c.exit_code, "reason": "Completed" if c.exit_code == 0 else "Error",
                                    "startedAt": c.started_at, "finishedAt": c.finished_at}}
        else:
            state = {"waiting": {"reason": "ContainerCreating"}}
        statuses.append({"name": c.name, "image": "local-process", "imageID": "", "ready": running,
                         "started": running, "restartCount": c.restarts, "state": state})
    return statuses


def pod_status(run: PodRun) -> dict:
    """The pod's status from its containers' processes (a pure function of the run)."""
    statuses = _container_statuses(run.containers)
    init_statuses = _container_statuses(run.init_containers)
    init_failed = any(c.exit_code not in (None, 0) for c in run.init_containers) and run.restart_policy == "Never"
    initialized = all(c.exit_code == 0 for c in run.init_containers)
    codes = [c.exit_code for c in run.containers]
    if init_failed:
        phase = "Failed"
    elif not initialized:
        phase = "Pending"
    elif all(code is not None for code in codes) and run.restart_policy != "Always":
        if all(code == 0 for code in codes):
            phase = "Succeeded"
        elif run.restart_policy == "Never":
            phase = "Failed"
        else:
            phase = "Running"
    else:
        phase = "Running"
    ready = "True" if phase == "Running" and all(s["ready"] for s in statuses) else "False"
    now = _now()
    return {
        "phase": phase,
        "hostIP": "127.0.0.1",
        "podIP": run.pod_ip,
        "podIPs": [{"ip": run.pod_ip}],
        "startTime": min((c.started_at for c in run.containers if c.started_at), default=now),
        "conditions": [
            {"type": "Initialized", "status": "True" if initialized else "False", "lastTransitionTime": now},
            {"type": "ContainersReady", "status": ready, "lastTransitionTime": now},
            {"type": "Ready", "status": ready, "lastTransitionTime": now},
        ],
        "containerStatuses": statuses,
        **({"initContainerStatuses": init_statuses} if init_statuses else {}),
    }


def _field_ref(pod: dict, path: str) -> str:
    meta = pod["metadata"]
    match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if match:
        return (meta.get(match.group(1)) or {}).get(match.group(2), "")
    return {
        "metadata.name": meta["name"], "metadata.namespace": meta["namespace"], "metadata.uid": meta["uid"],
        "spec.nodeName": pod["spec"].get("nodeName", ""), "spec.serviceAccountName": pod["spec"].get("serviceAccountName", ""),
        "status.podIP": "127.0.0.1", "status.hostIP": "127.0.0.1",
    }.get(path, "")


def _rewrite_hosts(value: str, local_names: set[str]) -> str:
    """Whole-word names of the namespace's Services and pods -> 127.0.0.1 (no cluster DNS here)."""
    for name in sorted(local_names, key=len, reverse=True):
        if name in value:
            value = re.sub(rf"(?<![\w./-]){re.escape(name)}(?![\w./-])", "127.0.0.1", value)
    return value


def _rewrite_paths(value: str, mounts: dict[str, Path]) -> str:
    """A container's mount paths -> the pod's volume folders, in one pass (the folders may themselves
    lie under a mount path such as /tmp, and must not be rewritten again). A mount path counts where
    it starts the value or follows `=`, `:` or a space, and ends there or at `/`, `:` or a space."""
    if not mounts:
        return value
    by_path = {m.rstrip("/") or "/": str(folder) for m, folder in mounts.items()}
    alternatives = "|".join(re.escape(m) for m in sorted(by_path, key=len, reverse=True))
    pattern = rf"(?:^|(?<=[=:\s]))({alternatives})(?=$|[/:\s])"
    return re.sub(pattern, lambda match: by_path[match.group(1)], value)


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m e2e.localcluster.noderuntime")
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--nodes", default="local-0")
    parser.add_argument("--prometheus-targets", default="")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    runtime = LocalNodeRuntime(Path(args.kubeconfig), Path(args.root), args.nodes.split(","),
                               Path(args.prometheus_targets) if args.prometheus_targets else None)
    runtime.run_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
