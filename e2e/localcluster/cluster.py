"""Start, stop and inspect the local cluster: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, the Kubeflow training-operator, KWOK with simulated GPU pools, an S3 server and
Prometheus -- every one a process on loopback, on free ports, with certificates made per run.

The cluster outlives the command that started it (`make cluster-up`); its state (ports, pids) is
kept in `.cluster/state.json`, so tests and `make cluster-down` find it again.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from . import build, certs, nodes, s3, versions
from .paths import REPO_ROOT, cache_dir, cluster_dir
from .procs import free_port, http_ok, port_open, start_logged, wait_until

SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/16"
TRAINING_OPERATOR_NAMESPACE = "kubeflow"
# Fixed by the training-operator (pkg/cert): where it expects its mounted webhook certificates.
TRAINING_OPERATOR_CERT_DIR = Path("/tmp/k8s-webhook-server/serving-certs")
TRAINING_OPERATOR_INIT_CONTAINER = REPO_ROOT / "operator/config/training-operator/pytorch-init-container.yaml"
TENANT_USER = "tenant-alice"
TENANT_GROUP = "finetune:tenants"
COMPONENT_ORDER = [
    "etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler",
    "kwok", "training-operator", "s3", "prometheus", "node-runtime",
]
LOCAL_NODES = ["local-0"]


@dataclass
class State:
    ports: dict[str, int] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    started_at: float = 0.0

    @classmethod
    def load(cls, path: Path) -> "State | None":
        if not path.exists():
            return None
        return cls(**json.loads(path.read_text()))

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


class LocalCluster:
    def __init__(self, root: Path | None = None):
        self.root = root or cluster_dir()
        self.pki = self.root / "pki"
        self.logs = self.root / "logs"
        self.bin = self.root / "bin"
        self.state_file = self.root / "state.json"
        self.kubeconfig = self.root / "kubeconfig"
        self.tenant_kubeconfig = self.root / "kubeconfig-tenant"
        self.state = State.load(self.state_file) or State()

    # ---- facts about a running cluster --------------------------------------------------------

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.state.ports['kube-apiserver']}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.state.ports['s3']}"

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.state.ports['prometheus']}"

    @property
    def prometheus_targets_dir(self) -> Path:
        return self.root / "prometheus" / "targets"

    @property
    def kubectl_path(self) -> Path:
        return self.bin / "kubectl"

    def kubectl(self, *args: str, kubeconfig: Path | None = None, input: str | None = None,
                check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.kubectl_path), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args],
            input=input, capture_output=True, text=True, check=check, timeout=timeout,
        )

    def alive(self) -> dict[str, bool]:
        return {name: _pid_alive(pid) for name, pid in self.state.pids.items()}

    def is_running(self) -> bool:
        alive = self.alive()
        return bool(alive) and all(alive.values()) and set(alive) == set(COMPONENT_ORDER) and self._apiserver_ready()

    def _apiserver_ready(self) -> bool:
        if "kube-apiserver" not in self.state.ports:
            return False
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        try:
            with urllib.request.urlopen(f"{self.server}/readyz", context=ctx, timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    # ---- up -----------------------------------------------------------------------------------

    def up(self, log=print) -> "LocalCluster":
        if self.is_running():
            log(f"local cluster already running ({self.server})")
            return self
        if self.state.pids:
            self.down(log=lambda *_: None)
        t0 = time.monotonic()
        for component in build.COMPONENTS.values():
            build.build(component, log=log)
        self._ensure_prometheus_installed(log)
        self._reset_dirs()
        self.state = State(ports={n: free_port() for n in [*COMPONENT_ORDER, "etcd-peer", "kwok-server",
                                                          "kcm-secure", "scheduler-secure",
                                                          "training-operator-webhook", "training-operator-probe"]},
                           started_at=time.time())
        self._link_binaries()
        self._write_pki_and_kubeconfigs()
        self._start_etcd()
        self._start_apiserver()
        self._start_controller_manager()
        self._start_scheduler()
        self._bootstrap_objects()
        self._start_kwok()
        self._start_training_operator()
        self._start_s3()
        self._start_prometheus()
        self._start_node_runtime()
        self._wait_nodes_ready()
        log(f"local cluster up in {time.monotonic() - t0:.1f}s")
        return self

    def _reset_dirs(self) -> None:
        for sub in ("pki", "etcd", "prometheus", "kwok", "training-operator", "pods"):
            shutil.rmtree(self.root / sub, ignore_errors=True)
        for d in (self.root, self.pki, self.logs, self.bin):
            d.mkdir(parents=True, exist_ok=True)

    def _link_binaries(self) -> None:
        for component in build.COMPONENTS.values():
            for name in component.binaries:
                link = self.bin / name
                link.unlink(missing_ok=True)
                link.symlink_to(component.binary(name))

    def _save(self) -> None:
        self.state.save(self.state_file)

    def _start(self, name: str, argv: list[str], env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
        log_file = self.logs / f"{name}.log"
        log_file.unlink(missing_ok=True)
        proc = start_logged(argv, log_file, env=env, cwd=cwd or self.root)
        self.state.pids[name] = proc.pid
        self._save()
        return proc

    def _write_pki_and_kubeconfigs(self) -> None:
        ca = certs.CertificateAuthority(self.pki)
        certs.service_account_keys(self.pki)
        ca.issue("apiserver", "kube-apiserver", server=True,
                 dns_names=("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                            "kubernetes.default.svc.cluster.local"),
                 ips=("127.0.0.1", "10.96.0.1"))
        identities = {
            "kubeconfig": ("admin", "finetune-admin", "system:masters"),
            "kube-controller-manager.kubeconfig": ("kcm", "system:kube-controller-manager", None),
            "kube-scheduler.kubeconfig": ("scheduler", "system:kube-scheduler", None),
            "kwok.kubeconfig": ("kwok", "kwok-controller", "system:masters"),
            "training-operator.kubeconfig": ("training-operator", "training-operator", "system:masters"),
            "kubeconfig-tenant": ("tenant", TENANT_USER, TENANT_GROUP),
        }
        for filename, (cert_name, cn, org) in identities.items():
            pair = ca.issue(cert_name, cn, org)
            self._write_kubeconfig(self.root / filename, cn, pair)

    def _write_kubeconfig(self, path: Path, user: str, pair: certs.KeyPair) -> None:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "finetune-local", "cluster": {
                "server": self.server, "certificate-authority": str(self.pki / "ca.crt")}}],
            "users": [{"name": user, "user": {
                "client-certificate": str(pair.cert), "client-key": str(pair.key)}}],
            "contexts": [{"name": "finetune-local", "context": {"cluster": "finetune-local", "user": user}}],
            "current-context": "finetune-local",
        }
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)

    def _start_etcd(self) -> None:
        p = self.state.ports
        proc = self._start("etcd", [
            str(build.ETCD.binary("etcd")),
            "--name=default", f"--data-dir={self.root / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{p['etcd']}",
            f"--advertise-client-urls=http://127.0.0.1:{p['etcd']}",
            f"--listen-peer-urls=http://127.0.0.1:{p['etcd-peer']}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{p['etcd-peer']}",
            f"--initial-cluster=default=http://127.0.0.1:{p['etcd-peer']}",
            "--unsafe-no-fsync", "--quota-backend-bytes=4294967296", "--log-level=warn",
        ])
        wait_until(lambda: port_open(p["etcd"]), 60, "etcd", proc=proc, log_file=self.logs / "etcd.log")

    def _start_apiserver(self) -> None:
        p, pki = self.state.ports, self.pki
        proc = self._start("kube-apiserver", [
            str(self.bin / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{p['etcd']}",
            "--bind-address=127.0.0.1", f"--secure-port={p['kube-apiserver']}",
            "--advertise-address=127.0.0.1",
            # The `kubernetes` Service would need a non-loopback endpoint; nothing in-cluster uses it.
            "--endpoint-reconciler-type=none",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--authorization-mode=Node,RBAC",
            # The defaults (PodSecurity, ResourceQuota, LimitRanger, ServiceAccount, ...) plus these.
            "--enable-admission-plugins=NodeRestriction,PodSecurity,ResourceQuota,LimitRanger",
            "--allow-privileged=true",
            "--profiling=false", "--v=1",
        ])
        wait_until(self._apiserver_ready, 120, "kube-apiserver /readyz", proc=proc,
                   log_file=self.logs / "kube-apiserver.log")

    def _start_controller_manager(self) -> None:
        p, pki = self.state.ports, self.pki
        self._start("kube-controller-manager", [
            str(self.bin / "kube-controller-manager"),
            f"--kubeconfig={self.root / 'kube-controller-manager.kubeconfig'}",
            f"--authentication-kubeconfig={self.root / 'kube-controller-manager.kubeconfig'}",
            f"--authorization-kubeconfig={self.root / 'kube-controller-manager.kubeconfig'}",
            "--bind-address=127.0.0.1", f"--secure-port={p['kcm-secure']}",
            "--leader-elect=false", "--use-service-account-credentials=true",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}", f"--cluster-signing-key-file={pki / 'ca.key'}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            "--controllers=*", "--concurrent-namespace-syncs=5", "--namespace-sync-period=30s",
            "--v=1",
        ])

    def _start_scheduler(self) -> None:
        p = self.state.ports
        kubeconfig = self.root / "kube-scheduler.kubeconfig"
        self._start("kube-scheduler", [
            str(self.bin / "kube-scheduler"),
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}", f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1", f"--secure-port={p['scheduler-secure']}",
            "--leader-elect=false", "--v=1",
        ])

    def _bootstrap_objects(self) -> None:
        """CRDs, the training-operator's namespace and cert Secret, the node pools, tenant RBAC."""
        wait_until(lambda: self.kubectl("get", "namespace", "default", check=False).returncode == 0, 60,
                   "default namespace")
        pytorchjob_crd = build.TRAINING_OPERATOR.module_dir() / "manifests/base/crds/kubeflow.org_pytorchjobs.yaml"
        self.kubectl("apply", "--server-side", "--field-manager=finetune-local", "-f", str(pytorchjob_crd))
        self.kubectl("apply", "--server-side", "--field-manager=finetune-local", "-f", "-",
                     input=yaml.safe_dump_all(nodes.bootstrap_objects(TRAINING_OPERATOR_NAMESPACE, TENANT_GROUP)))
        self.kubectl("wait", "--for=condition=Established", "crd/pytorchjobs.kubeflow.org", "--timeout=60s")

    def _start_kwok(self) -> None:
        p = self.state.ports
        self._start("kwok", [
            str(self.bin / "kwok"),
            f"--kubeconfig={self.root / 'kwok.kubeconfig'}",
            f"--config={Path(__file__).parent / 'kwok' / 'stages.yaml'}",
            f"--manage-nodes-with-annotation-selector={nodes.KWOK_ANNOTATION}=fake",
            f"--server-address=127.0.0.1:{p['kwok-server']}",
            "--cidr=10.244.0.0/16", "--node-ip=127.0.0.1",
        ])

    def _start_training_operator(self) -> None:
        p = self.state.ports
        env = dict(os.environ, KUBECONFIG=str(self.root / "training-operator.kubeconfig"),
                   MY_POD_NAMESPACE=TRAINING_OPERATOR_NAMESPACE)
        self._start("training-operator", [
            str(self.bin / "training-operator"),
            "--enable-scheme=pytorchjob",
            # A Pod Security `restricted` init container; the built-in one is rejected in sandboxes.
            f"--pytorch-init-container-template-file={TRAINING_OPERATOR_INIT_CONTAINER}",
            f"--metrics-bind-address=127.0.0.1:{p['training-operator']}",
            f"--health-probe-bind-address=127.0.0.1:{p['training-operator-probe']}",
            f"--webhook-server-port={p['training-operator-webhook']}",
        ], env=env)
        self._mount_training_operator_certs()

    def _mount_training_operator_certs(self) -> None:
        """Do what the kubelet's Secret volume does in a real cluster: put the certificates the
        training-operator's rotator generated into the folder its webhook server reads them from."""
        def secret_data() -> dict | None:
            out = self.kubectl("get", "secret", "-n", TRAINING_OPERATOR_NAMESPACE, "training-operator-webhook-cert",
                               "-o", "json", check=False)
            data = json.loads(out.stdout).get("data") or {} if out.returncode == 0 else {}
            return data if {"tls.crt", "tls.key", "ca.crt"} <= set(data) else None

        wait_until(lambda: secret_data() is not None, 60, "training-operator webhook certificate Secret")
        TRAINING_OPERATOR_CERT_DIR.mkdir(parents=True, exist_ok=True)
        for key, value in secret_data().items():
            (TRAINING_OPERATOR_CERT_DIR / key).write_bytes(base64.b64decode(value))

    def _start_s3(self) -> None:
        proc = self._start("s3", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.state.ports["s3"])])
        wait_until(lambda: port_open(self.state.ports["s3"]), 60, "S3 server", proc=proc, log_file=self.logs / "s3.log")
        # What the examples name must be there: a small model and the demo's domain datasets.
        with open(self.logs / "seed.log", "wb") as out:
            subprocess.run([sys.executable, "-m", "e2e.localcluster.seed", f"--endpoint={self.s3_endpoint}"],
                           cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, check=True)

    def _ensure_prometheus_installed(self, log) -> None:
        if shutil.which("prometheus"):
            return
        log("installing Prometheus from Debian's package")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"], check=True, env=env)

    def _start_prometheus(self) -> None:
        p = self.state.ports
        prom_dir = self.root / "prometheus"
        self.prometheus_targets_dir.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": "2s", "evaluation_interval": "5s"},
            "scrape_configs": [
                {"job_name": "prometheus", "static_configs": [{"targets": [f"127.0.0.1:{p['prometheus']}"]}]},
                {"job_name": "training-operator",
                 "static_configs": [{"targets": [f"127.0.0.1:{p['training-operator']}"]}]},
                # Tests, the operator and the node runtime drop target files here.
                {"job_name": "finetune", "file_sd_configs": [
                    {"files": [str(self.prometheus_targets_dir / "*.json")], "refresh_interval": "2s"}]},
            ],
        }
        (prom_dir / "prometheus.yml").write_text(yaml.safe_dump(config))
        proc = self._start("prometheus", [
            shutil.which("prometheus") or "prometheus",
            f"--config.file={prom_dir / 'prometheus.yml'}",
            f"--storage.tsdb.path={prom_dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{p['prometheus']}",
            "--web.enable-lifecycle", "--storage.tsdb.retention.time=1d",
        ])
        wait_until(lambda: http_ok(f"{self.prometheus_url}/-/ready"), 60, "Prometheus", proc=proc,
                   log_file=self.logs / "prometheus.log")

    @property
    def pods_dir(self) -> Path:
        return self.root / "pods"

    def _start_node_runtime(self) -> None:
        self._start("node-runtime", [
            sys.executable, "-m", "e2e.localcluster.noderuntime", f"--kubeconfig={self.kubeconfig}",
            f"--root={self.pods_dir}", f"--nodes={','.join(LOCAL_NODES)}",
            f"--prometheus-targets={self.prometheus_targets_dir}",
        ], env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), cwd=REPO_ROOT)

    def _wait_nodes_ready(self) -> None:
        def ready() -> bool:
            out = self.kubectl("get", "nodes", "-o", "json", check=False)
            if out.returncode != 0:
                return False
            items = json.loads(out.stdout)["items"]
            def is_ready(n):
                conds = {c["type"]: c["status"] for c in n.get("status", {}).get("conditions", [])}
                taints = {t["key"] for t in n.get("spec", {}).get("taints", [])}
                return conds.get("Ready") == "True" and "node.kubernetes.io/not-ready" not in taints
            return len(items) >= len(nodes.SIMULATED_NODES) + len(LOCAL_NODES) and all(is_ready(n) for n in items)
        wait_until(ready, 120, "simulated nodes Ready")
        # The training-operator serves its health endpoint once its certificates are in place.
        wait_until(lambda: http_ok(f"http://127.0.0.1:{self.state.ports['training-operator-probe']}/readyz"), 120,
                   "training-operator ready")

    # ---- down and status ----------------------------------------------------------------------

    def down(self, log=print) -> None:
        for name in reversed(COMPONENT_ORDER):
            pid = self.state.pids.get(name)
            if pid and _pid_alive(pid):
                _terminate_group(pid)
                log(f"stopped {name} (pid {pid})")
        self.state = State()
        self.state_file.unlink(missing_ok=True)
        for sub in ("etcd", "prometheus", "kwok", "training-operator"):
            shutil.rmtree(self.root / sub, ignore_errors=True)

    def status_lines(self) -> list[str]:
        if not self.state.pids:
            return ["local cluster: not running"]
        lines = [f"local cluster: {'ready' if self._apiserver_ready() else 'NOT ready'} at {self.server}"]
        for name in COMPONENT_ORDER:
            pid = self.state.pids.get(name)
            mark = "running" if pid and _pid_alive(pid) else "STOPPED"
            lines.append(f"  {name:<24} {mark:<8} pid {pid}  port {self.state.ports.get(name)}  log {self.logs / (name + '.log')}")
        lines += [
            f"  S3 endpoint:  {self.s3_endpoint}  (access key {s3.ACCESS_KEY}, secret {s3.SECRET_KEY})",
            f"  Prometheus:   {self.prometheus_url}",
            f"  kubeconfig:   export KUBECONFIG={self.kubeconfig}; export PATH={self.bin}:$PATH",
        ]
        return lines


def _terminate_group(pid: int, grace: float = 10) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _pid_alive(pid):
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def versions_table() -> dict[str, str]:
    return {
        "kubernetes": versions.KUBERNETES, "etcd": versions.ETCD,
        "training-operator": versions.TRAINING_OPERATOR, "kwok": versions.KWOK,
        "cache": str(cache_dir()), "repo": str(REPO_ROOT),
    }
