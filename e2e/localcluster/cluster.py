"""Start, stop and inspect the local cluster: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, the Kubeflow training-operator, Kueue, KWOK with simulated GPU pools, an S3 server,
Prometheus and the real node `node-0` (containerd, kubelet, kube-proxy, kube-router's NetworkPolicy
firewall, CoreDNS) -- every one a process of this machine, on free ports, with certificates made
per run. Control-plane internals listen on loopback; what pods use (the API server, S3, Prometheus,
the kubelet) listens on the node's bridge address (network.NODE_IP), which the host reaches too.

The cluster outlives the command that started it (`make cluster-up`); its state (ports, pids) is
kept in `.cluster/state.json`, so tests and `make cluster-down` find it again.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from . import addons, build, certs, debian, images, kueue, network, nodes, s3, versions
from . import prometheus
from .node import NODE_NAME, NODE_OWNER_FILE, NodePaths, NodeRuntime, node_owner
from . import node as node_config
from .paths import REPO_ROOT, cache_dir, cluster_dir
from .procs import free_ports, http_ok, pid_alive, port_open, start_logged, terminate_group, wait_until

SERVICE_CLUSTER_IP_RANGE = network.SERVICE_CIDR
TRAINING_OPERATOR_NAMESPACE = "kubeflow"
# Fixed by the training-operator (pkg/cert): where it expects its mounted webhook certificates.
TRAINING_OPERATOR_CERT_DIR = Path("/tmp/k8s-webhook-server/serving-certs")
FRONT_PROXY_CLIENT = "front-proxy-client"  # the aggregator's client certificate, the only name it may have
TRAINING_OPERATOR_INIT_CONTAINER = REPO_ROOT / "operator/config/training-operator/pytorch-init-container.yaml"
TENANT_USER = "tenant-alice"
TENANT_GROUP = "finetune:tenants"
COMPONENT_ORDER = [
    "etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler",
    "kwok", "training-operator", "kueue", "s3", "prometheus",
    "containerd", "kubelet", "kube-proxy", "kube-router",
]
LOCAL_NODES = [NODE_NAME]
# Images every start imports into the node's containerd (`images.py` builds them).
NODE_IMAGES = ("pause", "base", "coredns", "trainer", "operator")


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


class KubectlError(subprocess.CalledProcessError):
    """A failed kubectl whose message carries what kubectl said (CalledProcessError's omits it)."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstderr: {(self.stderr or '').strip()[-2000:]}"


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
        return f"https://{network.NODE_IP}:{self.state.ports['kube-apiserver']}"

    @property
    def s3_endpoint(self) -> str:
        """Where the host and the pods reach S3."""
        return f"http://{network.NODE_IP}:{self.state.ports['s3']}"

    @property
    def prometheus_url(self) -> str:
        return f"http://{network.NODE_IP}:{self.state.ports['prometheus']}"

    @property
    def node_paths(self) -> NodePaths:
        return NodePaths(self.root / "node", images.containerd_store())

    @property
    def node_runtime(self) -> NodeRuntime:
        return NodeRuntime(self.node_paths, build.CRI_TOOLS.binary("crictl"), self.root / "crictl.yaml")

    def image(self, name: str) -> str:
        """The reference of one of the project's images, as the node's containerd knows it."""
        return images.ref(images.IMAGES[name] if name != "coredns" else images.coredns_spec(build.COREDNS.binary("coredns")))

    @property
    def prometheus_targets_dir(self) -> Path:
        return self.root / "prometheus" / "targets"

    @property
    def kubectl_path(self) -> Path:
        return self.bin / "kubectl"

    def kubectl(self, *args: str, kubeconfig: Path | None = None, input: str | None = None,
                check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [str(self.kubectl_path), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args],
            input=input, capture_output=True, text=True, timeout=timeout,
        )
        if check and result.returncode != 0:
            raise KubectlError(result.returncode, result.args, result.stdout, result.stderr)
        return result

    def wait_condition(self, condition: str, *resources: str, timeout: float = 120) -> None:
        """Wait until each resource (`kind/name`) has `condition` True; a timeout names each one's conditions.

        Polled rather than `kubectl wait`, whose one watch ends the wait on any hiccup of the API server (a
        CI run on 2 busy cores failed there without saying why)."""
        seen: dict[str, object] = {}

        def met() -> bool:
            out = self.kubectl("get", *resources, "-o", "json", check=False, timeout=30)
            if out.returncode != 0:
                seen["kubectl"] = out.stderr.strip()
                return False
            body = json.loads(out.stdout)
            items = body["items"] if "items" in body else [body]  # one resource comes alone, several as a List
            seen.clear()
            seen.update({item["metadata"]["name"]: {c["type"]: c["status"]
                                                    for c in (item.get("status") or {}).get("conditions") or []}
                         for item in items})
            return len(items) == len(resources) and all(c.get(condition) == "True" for c in seen.values())
        try:
            wait_until(met, timeout, f"{condition} of {', '.join(resources)}", interval=0.5)
        except TimeoutError as error:
            raise TimeoutError(f"{error}: {seen}") from None

    def alive(self) -> dict[str, bool]:
        return {name: pid_alive(pid) for name, pid in self.state.pids.items()}

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
            self.configure_prometheus(log)
            return self
        if self.state.pids:
            self.down(log=lambda *_: None)
        t0 = time.monotonic()
        debian.ensure_packages(debian.NODE_PACKAGES, log=log)
        for component in build.COMPONENTS.values():
            build.build(component, log=log)
        node_images = self._node_image_specs()
        for spec in node_images:
            images.ensure_built(spec, log=log)
        self._claim_node()
        self._reset_dirs()
        self.state = State(ports=free_ports([*COMPONENT_ORDER, "etcd-peer", "kwok-server", "kcm-secure",
                                             "scheduler-secure", "training-operator-webhook", "training-operator-probe",
                                             "kueue-webhook", "kueue-probe", "kueue-visibility", "kubelet-healthz",
                                             "kube-proxy-metrics",
                                             "kube-router-health"]),
                           started_at=time.time())
        self._link_binaries()
        network.HostNetwork(self.node_paths.cni_conf_dir, self.node_paths.cni_ipam_dir).setup()
        self._write_pki_and_kubeconfigs()
        self._start_etcd()
        self._start_apiserver()
        self._start_controller_manager()
        self._start_scheduler()
        self._bootstrap_objects()
        self._start_kwok()
        self._start_training_operator()
        self._start_kueue()
        self._start_s3()
        self._start_prometheus()
        self._start_containerd()
        self.ensure_node_images(log)
        self._start_kubelet()
        self._start_kube_proxy()
        self._start_kube_router()
        self.kubectl("apply", "--server-side", "--field-manager=finetune-local", "-f", "-",
                     input=yaml.safe_dump_all(addons.dns_objects(self.image("coredns"))))
        self._wait_nodes_ready()
        self._record_node_pod_range()
        self._register_kueue_webhooks()
        log(f"local cluster up in {time.monotonic() - t0:.1f}s")
        return self

    def ensure_node_images(self, log=print) -> None:
        """This tree's images in the node's containerd: imported when missing or changed (the kubelet
        under disk pressure deletes images that no container uses, the sandbox image among them on
        containerd 1.6, which cannot pin it)."""
        for spec in self._node_image_specs():
            images.import_into_containerd(spec, self.node_paths.containerd_socket, log=log)

    def _node_image_specs(self) -> list:
        return [images.coredns_spec(build.COREDNS.binary("coredns")) if name == "coredns" else images.IMAGES[name]
                for name in NODE_IMAGES]

    def _claim_node(self) -> None:
        """The real node's resources exist once per machine: refuse to start a second one."""
        owner = node_owner()
        if owner.get("root") != str(self.root) and pid_alive(owner.get("containerd", 0)):
            if owner.get("purpose"):
                raise RuntimeError(f"{owner['purpose']} (containerd {owner['containerd']}) holds the node's image "
                                   f"store; start the cluster once it is done")
            raise RuntimeError(f"the real node of another local cluster ({owner['root']}) is running on this "
                               f"machine; stop it first (make cluster-down in that checkout)")
        NODE_OWNER_FILE.write_text(json.dumps({"root": str(self.root)}))

    def _reset_dirs(self) -> None:
        for sub in ("pki", "etcd", "prometheus", "kwok", "training-operator", "kueue"):
            shutil.rmtree(self.root / sub, ignore_errors=True)
        for path in self.node_paths.ephemeral():
            node_config.unmount_under(path)
            shutil.rmtree(path, ignore_errors=True)
        for d in (self.root, self.pki, self.logs, self.bin, self.node_paths.root):
            d.mkdir(parents=True, exist_ok=True)

    def _link_binaries(self) -> None:
        for component in build.COMPONENTS.values():
            for name in component.binaries:
                link = self.bin / name
                link.unlink(missing_ok=True)
                link.symlink_to(component.binary(name))
        # `crictl` on PATH (make's PATH has .cluster/bin) talks to this node's containerd.
        (self.root / "crictl.yaml").write_text(node_config.crictl_config(self.node_paths))

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
                 ips=("127.0.0.1", network.NODE_IP, network.KUBERNETES_SERVICE_IP))
        ca.issue("kubelet-serving", NODE_NAME, server=True, dns_names=(NODE_NAME,), ips=(network.NODE_IP,))
        ca.issue("apiserver-kubelet-client", addons.APISERVER_KUBELET_CLIENT)
        ca.issue("prometheus", addons.PROMETHEUS_USER)
        # Kueue's webhook and metrics servers on loopback, where the API server calls them.
        ca.issue("kueue-serving", "kueue-webhook", server=True, ips=("127.0.0.1",))
        # Kueue's visibility API, where the aggregator proxies to (it checks the Service's DNS name).
        ca.issue("kueue-visibility", "kueue-visibility", server=True, dns_names=(kueue.visibility_dns_name(),),
                 ips=(network.NODE_IP,))
        # The aggregation layer: a CA of its own for the front proxy's client certificate (as kubeadm does),
        # so that no other certificate of the cluster CA can assert a user in request headers.
        certs.CertificateAuthority(self.pki / "front-proxy", "finetune-local-front-proxy-ca").issue(
            "front-proxy-client", FRONT_PROXY_CLIENT)
        identities = {
            "kubeconfig": ("admin", "finetune-admin", "system:masters"),
            "kube-controller-manager.kubeconfig": ("kcm", "system:kube-controller-manager", None),
            "kube-scheduler.kubeconfig": ("scheduler", "system:kube-scheduler", None),
            "kwok.kubeconfig": ("kwok", "kwok-controller", "system:masters"),
            "training-operator.kubeconfig": ("training-operator", "training-operator", "system:masters"),
            "kueue.kubeconfig": ("kueue", "kueue-controller", "system:masters"),
            "kubeconfig-tenant": ("tenant", TENANT_USER, TENANT_GROUP),
            # The real node's processes, each as its own identity (Node authorizer, NodeRestriction).
            "kubelet.kubeconfig": ("kubelet", f"system:node:{NODE_NAME}", "system:nodes"),
            "kube-proxy.kubeconfig": ("kube-proxy", addons.KUBE_PROXY_USER, None),
            "kube-router.kubeconfig": ("kube-router", addons.KUBE_ROUTER_USER, None),
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
            # On the node's bridge address: the host and the pods (through the `kubernetes` Service,
            # whose endpoint is the advertised address) reach it there.
            f"--bind-address={network.NODE_IP}", f"--secure-port={p['kube-apiserver']}",
            f"--advertise-address={network.NODE_IP}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            f"--service-node-port-range={network.NODE_PORT_RANGE}",
            f"--kubelet-certificate-authority={pki / 'ca.crt'}",
            f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
            "--kubelet-preferred-address-types=InternalIP",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--authorization-mode=Node,RBAC",
            # The aggregation layer (Kueue's visibility API), routed to the Service's endpoints.
            f"--requestheader-client-ca-file={pki / 'front-proxy' / 'ca.crt'}",
            f"--requestheader-allowed-names={FRONT_PROXY_CLIENT}",
            "--requestheader-username-headers=X-Remote-User", "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={pki / 'front-proxy' / 'front-proxy-client.crt'}",
            f"--proxy-client-key-file={pki / 'front-proxy' / 'front-proxy-client.key'}",
            "--enable-aggregator-routing=true",
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
        """CRDs, the training-operator's and Kueue's namespaces, the training-operator's cert Secret,
        the node pools, tenant RBAC."""
        wait_until(lambda: self.kubectl("get", "namespace", "default", check=False).returncode == 0, 60,
                   "default namespace")
        pytorchjob_crd = build.TRAINING_OPERATOR.module_dir() / "manifests/base/crds/kubeflow.org_pytorchjobs.yaml"
        self.kubectl("apply", "--server-side", "--field-manager=finetune-local", "-f", str(pytorchjob_crd))
        self.kubectl("apply", "--server-side", "--field-manager=finetune-local", "-f", "-",
                     input=yaml.safe_dump_all(nodes.bootstrap_objects(TRAINING_OPERATOR_NAMESPACE, TENANT_GROUP)
                                              + addons.node_rbac()))
        kueue_crds = kueue.crds(build.KUEUE.module_dir(), port=self.state.ports["kueue-webhook"],
                                ca_bundle=(self.pki / "ca.crt").read_bytes())
        self.kubectl("apply", "--server-side", "--field-manager=finetune-local", "-f", "-",
                     input=yaml.safe_dump_all([*kueue_crds, {"apiVersion": "v1", "kind": "Namespace",
                                                             "metadata": {"name": kueue.NAMESPACE}}]))
        self.wait_condition("Established", "crd/pytorchjobs.kubeflow.org",
                            *(f"crd/{crd['metadata']['name']}" for crd in kueue_crds), timeout=60)

    def _start_kwok(self) -> None:
        p = self.state.ports
        self._start("kwok", [
            str(self.bin / "kwok"),
            f"--kubeconfig={self.root / 'kwok.kubeconfig'}",
            f"--config={Path(__file__).parent / 'kwok' / 'stages.yaml'}",
            f"--manage-nodes-with-annotation-selector={nodes.KWOK_ANNOTATION}=fake",
            f"--server-address=127.0.0.1:{p['kwok-server']}",
            f"--cidr={network.SIMULATED_POD_CIDR}", "--node-ip=127.0.0.1",
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
            # Workers wait for the master's DNS name with sh and getent: the base image has both.
            f"--pytorch-init-container-image={self.image('base')}",
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

    def _start_kueue(self) -> None:
        p, kueue_dir = self.state.ports, self.root / "kueue"
        cert_dir = kueue_dir / "certs"
        for directory, pair in ((cert_dir, "kueue-serving"), (kueue.METRICS_CERT_DIR, "kueue-serving"),
                                (kueue.VISIBILITY_CERT_DIR, "kueue-visibility")):
            directory.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.pki / f"{pair}.crt", directory / "tls.crt")
            shutil.copyfile(self.pki / f"{pair}.key", directory / "tls.key")
        config_file = kueue_dir / "config.yaml"
        config_file.write_text(yaml.safe_dump(kueue.configuration(
            webhook_port=p["kueue-webhook"], cert_dir=cert_dir, metrics_port=p["kueue"], health_port=p["kueue-probe"],
            visibility_address=network.NODE_IP, visibility_port=p["kueue-visibility"])))
        kubeconfig = self.root / "kueue.kubeconfig"
        env = dict(os.environ, KUBECONFIG=str(kubeconfig))
        # --kubeconfig as a flag too: the visibility server delegates authentication and authorization
        # through the kubeconfig the flag names (in-cluster config otherwise).
        self._start("kueue", [str(self.bin / "kueue"), f"--config={config_file}", f"--kubeconfig={kubeconfig}",
                              "--zap-log-level=2"], env=env)

    def _register_kueue_webhooks(self) -> None:
        """Kueue's webhooks fail closed (failurePolicy Fail): registered only once Kueue serves them,
        or every create of a Job or PyTorchJob would be refused meanwhile."""
        log_file = self.logs / "kueue.log"

        def ready() -> bool:
            if not pid_alive(self.state.pids["kueue"]):
                raise RuntimeError(f"Kueue exited:\n{log_file.read_text(errors='replace')[-3000:]}")
            return http_ok(f"http://127.0.0.1:{self.state.ports['kueue-probe']}/readyz")

        wait_until(ready, 120, "Kueue ready")
        ca_bundle = (self.pki / "ca.crt").read_bytes()
        configurations = kueue.webhooks(build.KUEUE.module_dir(), port=self.state.ports["kueue-webhook"],
                                        ca_bundle=ca_bundle)
        visibility = kueue.visibility_objects(address=network.NODE_IP, port=self.state.ports["kueue-visibility"],
                                              ca_bundle=ca_bundle)
        self.kubectl("apply", "--server-side", "--field-manager=finetune-local", "-f", "-",
                     input=yaml.safe_dump_all(configurations + visibility))
        # Registered only now that Kueue serves it: an unavailable aggregated API fails discovery, and
        # with it the namespace controller's deletions.
        self.wait_condition("Available", f"apiservice/{visibility[-1]['metadata']['name']}", timeout=60)

    def _start_s3(self) -> None:
        proc = self._start("s3", [sys.executable, "-m", "moto.server", "-H", network.NODE_IP,
                                  "-p", str(self.state.ports["s3"])])
        wait_until(lambda: port_open(self.state.ports["s3"], network.NODE_IP), 60, "S3 server", proc=proc,
                   log_file=self.logs / "s3.log")
        # What the examples name must be there: a small model and the demo's domain datasets.
        with open(self.logs / "seed.log", "wb") as out:
            subprocess.run([sys.executable, "-m", "e2e.localcluster.seed", f"--endpoint={self.s3_endpoint}"],
                           cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, check=True)

    @property
    def prometheus_config_file(self) -> Path:
        return self.root / "prometheus" / "prometheus.yml"

    def prometheus_scrape_configs(self) -> list[dict]:
        """The scrape jobs of the chart's ServiceMonitor and PodMonitor for the release the tests
        install (operator_release.RELEASE in NAMESPACE), as the Prometheus Operator writes them."""
        from .operator_release import CHART, NAMESPACE, RELEASE  # operator_release imports this module

        build.build(build.HELM, log=lambda *_: None)
        monitors = prometheus.chart_monitors(build.HELM.binary("helm"), CHART, RELEASE, NAMESPACE)
        return prometheus.monitor_scrape_configs(monitors, api_server=self.server, pki=self.pki)

    def configure_prometheus(self, log=print) -> bool:
        """Write Prometheus' configuration from this tree's chart; a running Prometheus reloads it
        when it changed. Returns whether it changed."""
        p = self.state.ports
        text = yaml.safe_dump(prometheus.prometheus_config(
            own_port=p["prometheus"], training_operator_port=p["training-operator"],
            targets_dir=self.prometheus_targets_dir, monitor_jobs=self.prometheus_scrape_configs()), sort_keys=False)
        path = self.prometheus_config_file
        if path.exists() and path.read_text() == text:
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        # A cluster started before discovery needed EndpointSlices gets the read access now.
        self.kubectl("apply", "--server-side", "--field-manager=finetune-local", "-f", "-",
                     input=yaml.safe_dump_all(addons.prometheus_rbac()))
        path.write_text(text)
        if self.state.pids.get("prometheus") and pid_alive(self.state.pids["prometheus"]):
            self.reload_prometheus()
            log("Prometheus reloaded its configuration (the chart's monitors changed)")
        return True

    def reload_prometheus(self) -> None:
        """POST /-/reload (--web.enable-lifecycle); Prometheus answers once the new configuration
        is applied, or with an error when it rejected it (it keeps the old one then)."""
        request = urllib.request.Request(f"{self.prometheus_url}/-/reload", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30):
                pass
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"Prometheus rejected {self.prometheus_config_file}: {exc.read().decode()}") from exc

    def _start_prometheus(self) -> None:
        p = self.state.ports
        prom_dir = self.root / "prometheus"
        self.prometheus_targets_dir.mkdir(parents=True, exist_ok=True)
        self.configure_prometheus()
        proc = self._start("prometheus", [
            str(self.bin / "prometheus"),
            f"--config.file={self.prometheus_config_file}",
            f"--storage.tsdb.path={prom_dir / 'data'}",
            f"--web.listen-address={network.NODE_IP}:{p['prometheus']}",
            "--web.enable-lifecycle", "--storage.tsdb.retention.time=1d",
        ])
        wait_until(lambda: http_ok(f"{self.prometheus_url}/-/ready"), 60, "Prometheus", proc=proc,
                   log_file=self.logs / "prometheus.log")

    # ---- the real node --------------------------------------------------------------------------

    def _start_containerd(self) -> None:
        paths = self.node_paths
        paths.containerd_config.parent.mkdir(parents=True, exist_ok=True)
        paths.containerd_config.write_text(node_config.containerd_config(paths, self.image("pause")))
        paths.containerd_socket.unlink(missing_ok=True)
        proc = self._start("containerd", ["containerd", f"--config={paths.containerd_config}"])
        NODE_OWNER_FILE.write_text(json.dumps({"root": str(self.root), "containerd": proc.pid}))
        wait_until(lambda: node_config.containerd_answers(paths.containerd_socket), 60, "containerd",
                   proc=proc, log_file=self.logs / "containerd.log")

    def _start_kubelet(self) -> None:
        paths, pki = self.node_paths, self.pki
        paths.resolv_conf.write_text("# no upstream resolver: pods never leave this machine\n")
        config = node_config.kubelet_config(paths, pki / "ca.crt", pki / "kubelet-serving.crt",
                                            pki / "kubelet-serving.key", self.state.ports["kubelet-healthz"])
        paths.kubelet_config.write_text(yaml.safe_dump(config))
        proc = self._start("kubelet", node_config.kubelet_argv(self.bin / "kubelet", paths,
                                                              self.root / "kubelet.kubeconfig"))
        wait_until(lambda: http_ok(f"http://127.0.0.1:{self.state.ports['kubelet-healthz']}/healthz"), 120,
                   "kubelet healthz", proc=proc, log_file=self.logs / "kubelet.log")

    def _start_kube_proxy(self) -> None:
        p, paths = self.state.ports, self.node_paths
        paths.kube_proxy_config.write_text(yaml.safe_dump(node_config.kube_proxy_config(
            self.root / "kube-proxy.kubeconfig", p["kube-proxy"], p["kube-proxy-metrics"])))
        proc = self._start("kube-proxy", [str(self.bin / "kube-proxy"), f"--config={paths.kube_proxy_config}",
                                          "--v=1"])
        wait_until(lambda: http_ok(f"http://127.0.0.1:{p['kube-proxy']}/healthz"), 60, "kube-proxy healthz",
                   proc=proc, log_file=self.logs / "kube-proxy.log")

    def _start_kube_router(self) -> None:
        port = self.state.ports["kube-router-health"]
        proc = self._start("kube-router", node_config.kube_router_argv(
            self.bin / "kube-router", self.root / "kube-router.kubeconfig", port))
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/healthz"), 60, "kube-router healthz",
                   proc=proc, log_file=self.logs / "kube-router.log")

    def _stop_node(self, log) -> None:
        """Stop the node so that nothing of it stays behind: the kubelet first (it would restart
        what goes), then every pod through the CRI (processes, network namespaces, addresses), the
        policy and proxy rules, containerd and its shims, the mounts and the bridge."""
        self._stop_component("kubelet", log)
        runtime = self.node_runtime
        if "containerd" in self.state.pids and pid_alive(self.state.pids["containerd"]):
            try:
                runtime.remove_all_pods()
            except (OSError, subprocess.SubprocessError) as exc:
                log(f"removing the node's pods: {exc}")
        for name in ("kube-router", "kube-proxy", "containerd"):
            self._stop_component(name, log)
        node_config.kill_leftover_shims(self.node_paths)
        cleanups = [[str(self.bin / "kube-proxy"), "--cleanup"],
                    [str(self.bin / "kube-router"), "--cleanup-config"]]
        for argv in cleanups:
            if Path(argv[0]).exists():
                subprocess.run(argv, capture_output=True, check=False, timeout=120)
        for path in self.node_paths.ephemeral():
            node_config.unmount_under(path)
        network.HostNetwork(self.node_paths.cni_conf_dir, self.node_paths.cni_ipam_dir).teardown()
        if NODE_OWNER_FILE.exists() and json.loads(NODE_OWNER_FILE.read_text()).get("root") == str(self.root):
            NODE_OWNER_FILE.unlink()

    def _stop_component(self, name: str, log) -> None:
        pid = self.state.pids.get(name)
        if pid and pid_alive(pid):
            terminate_group(pid)
            log(f"stopped {name} (pid {pid})")

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
        wait_until(ready, 120, "nodes Ready")
        wait_until(lambda: self.kubectl("rollout", "status", "-n", addons.DNS_NAMESPACE,
                                        f"deployment/{addons.DNS_NAME}", "--timeout=5s",
                                        check=False).returncode == 0, 120, "CoreDNS ready")
        # The training-operator serves its health endpoint once its certificates are in place.
        wait_until(lambda: http_ok(f"http://127.0.0.1:{self.state.ports['training-operator-probe']}/readyz"), 120,
                   "training-operator ready")

    def _record_node_pod_range(self) -> None:
        """The real node's pod range in its spec.podCIDRs, as kube-controller-manager's range allocator records
        it in a kubeadm or kind cluster (this cluster has no allocator: the CNI's range is fixed). Set once; the
        field cannot change, so a restarted cluster finds it set. The operator's discoverClusterNetworks reads it."""
        node = json.loads(self.kubectl("get", "node", NODE_NAME, "-o", "json").stdout)
        if (node.get("spec") or {}).get("podCIDRs"):
            return
        self.kubectl("patch", "node", NODE_NAME, "--type=merge", "-p",
                     json.dumps({"spec": {"podCIDR": network.NODE_POD_CIDR, "podCIDRs": [network.NODE_POD_CIDR]}}))

    # ---- down and status ----------------------------------------------------------------------

    def down(self, log=print) -> None:
        self._stop_node(log)
        for name in reversed(COMPONENT_ORDER):
            self._stop_component(name, log)
        self.state = State()
        self.state_file.unlink(missing_ok=True)
        for sub in ("etcd", "prometheus", "kwok", "training-operator", "kueue"):
            shutil.rmtree(self.root / sub, ignore_errors=True)

    def leftovers(self) -> list[str]:
        """What of the cluster is still there: processes started from .cluster/ or running in a
        container of the node, mounts under it, the pod bridge, the metadata stand-in, the
        FTO-ISOLATE chains. Empty after a clean `down`."""
        root = str(self.root.resolve())
        found = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                fs_root = os.readlink(proc / "root")
            except OSError:  # gone meanwhile, or a kernel thread
                continue
            if cmdline and (root + "/" in cmdline or fs_root.startswith(root + "/")):
                found.append(f"process {proc.name}: {cmdline[:160]}")
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            mount_point = line.split()[4].encode().decode("unicode_escape")
            if mount_point.startswith(root + "/"):
                found.append(f"mount {mount_point}")
        for interface in (network.BRIDGE, network.METADATA_LINK):
            if Path("/sys/class/net", interface).exists():
                found.append(f"network interface {interface}")
        if Path("/run/netns", network.METADATA_NETNS).exists():
            found.append(f"network namespace {network.METADATA_NETNS}")
        rules = subprocess.run(["ip", "rule", "list", "table", network.METADATA_ROUTE_TABLE], capture_output=True,
                               text=True, check=False).stdout.strip()
        if rules:
            found.append(f"ip rules to table {network.METADATA_ROUTE_TABLE}")
        for tool in ("iptables", "ip6tables"):
            if subprocess.run([tool, "-w", "-n", "-L", network.ISOLATION_CHAIN], capture_output=True,
                              check=False).returncode == 0:
                found.append(f"{tool} chain {network.ISOLATION_CHAIN}")
        return found

    def status_lines(self) -> list[str]:
        if not self.state.pids:
            return ["local cluster: not running"]
        lines = [f"local cluster: {'ready' if self._apiserver_ready() else 'NOT ready'} at {self.server}"]
        for name in COMPONENT_ORDER:
            pid = self.state.pids.get(name)
            mark = "running" if pid and pid_alive(pid) else "STOPPED"
            lines.append(f"  {name:<24} {mark:<8} pid {pid}  port {self.state.ports.get(name)}  log {self.logs / (name + '.log')}")
        lines += [
            f"  S3 endpoint:  {self.s3_endpoint}  (access key {s3.ACCESS_KEY}, secret {s3.SECRET_KEY})",
            f"  Prometheus:   {self.prometheus_url}",
            f"  kubeconfig:   export KUBECONFIG={self.kubeconfig}; export PATH={self.bin}:$PATH",
        ]
        return lines


def versions_table() -> dict[str, str]:
    return {
        "kubernetes": versions.KUBERNETES, "etcd": versions.ETCD,
        "training-operator": versions.TRAINING_OPERATOR, "kueue": versions.KUEUE, "kwok": versions.KWOK,
        "cache": str(cache_dir()), "repo": str(REPO_ROOT),
    }
