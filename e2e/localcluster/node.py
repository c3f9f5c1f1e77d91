"""The real node `node-0` of the pool `local`: containerd + runc + the CNI bridge, the kubelet,
kube-proxy and kube-router's network policy firewall, as processes of this machine.

The configurations are pure functions of the cluster's paths and ports (tested as tables in
tests/test_localcluster.py); `cluster.py` starts the processes and `NodeRuntime` holds what talks
to containerd (image import, pods' processes, the cleanup at `cluster-down`).

containerd's root (the image store: content, unpacked snapshots, metadata) is in the machine's
cache (`~/.cache/finetune-operator/containerd`), shared by every checkout as the image archives are:
one real node runs on a machine at a time, and a new checkout's node (CI's clean clone) then finds
the images of an earlier one and imports only the layers that changed. Everything else lives under
`.cluster/node/` and is wiped at every start: containerd's state, the kubelet's root, pod logs and
the CNI configuration and address allocations. `make cluster-build` fills the image store ahead of
a first start, with a containerd of its own (`image_store_config`, `images.preload_node_store`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from . import network
from .nodes import POOL_LABEL

NODE_NAME = "node-0"
POOL = "local"
# Only pods that ask for the real node land on it (the simulated pools take the rest), as on a
# cluster whose GPU pools are tainted.
NODE_TAINT = {"key": POOL_LABEL, "value": POOL, "effect": "NoSchedule"}
NODE_TOLERATION = {"key": POOL_LABEL, "operator": "Equal", "value": POOL, "effect": "NoSchedule"}
KUBELET_PORT = 10250
CNI_BIN_DIR = Path("/usr/lib/cni")
RUNC = "/usr/sbin/runc"
CONTAINERD_NAMESPACE = "k8s.io"
# Machine-wide: the bridge, iptables and containerd's shim sockets exist once per machine, and so
# does the image store; one containerd runs on it at a time: a checkout's node, or `make
# cluster-build` importing images into it.
NODE_OWNER_FILE = Path("/run/finetune-operator-node.json")
# Snapshotters this machine cannot run would only log errors at every start.
UNUSABLE_PLUGINS = ("io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing")


def node_owner() -> dict:
    """Who holds the machine's node ({} when nobody does): `root`, the checkout whose cluster it is;
    `containerd`, the pid of the containerd on the image store once one runs; `purpose`, what holds
    the store when it is not a cluster."""
    try:
        return json.loads(NODE_OWNER_FILE.read_text())
    except (OSError, ValueError):
        return {}


def _toml_strings(items) -> str:
    return "[" + ", ".join(f'"{item}"' for item in items) + "]"


def _containerd_base_config(root: Path, state: Path, socket: Path, disabled: tuple[str, ...]) -> list[str]:
    """What every containerd of ours has: its root and state, the plugins it leaves off, its socket."""
    return [
        "version = 2",
        f'root = "{root}"',
        f'state = "{state}"',
        f"disabled_plugins = {_toml_strings(disabled)}",
        "",
        "[grpc]",
        f'  address = "{socket}"',
        "[ttrpc]",
        f'  address = "{socket}.ttrpc"',
        "[debug]",
        '  level = "warn"',
        "",
    ]


def containerd_answers(socket: Path) -> bool:
    return subprocess.run(["ctr", "--address", str(socket), "version"], capture_output=True,
                          check=False).returncode == 0


@dataclass(frozen=True)
class NodePaths:
    root: Path  # .cluster/node
    containerd_root: Path  # the image store, shared by every checkout (images.containerd_store())

    @property
    def containerd_state(self) -> Path:
        return self.root / "containerd" / "state"

    @property
    def containerd_socket(self) -> Path:
        return self.root / "containerd" / "containerd.sock"

    @property
    def containerd_config(self) -> Path:
        return self.root / "containerd" / "config.toml"

    @property
    def kubelet_root(self) -> Path:
        return self.root / "kubelet"

    @property
    def kubelet_config(self) -> Path:
        return self.root / "kubelet-config.yaml"

    @property
    def pod_logs(self) -> Path:
        return self.root / "pod-logs"

    @property
    def cni_conf_dir(self) -> Path:
        return self.root / "cni" / "net.d"

    @property
    def cni_ipam_dir(self) -> Path:
        return self.root / "cni" / "ipam"

    @property
    def kube_proxy_config(self) -> Path:
        return self.root / "kube-proxy-config.yaml"

    @property
    def resolv_conf(self) -> Path:
        return self.root / "resolv.conf"

    def ephemeral(self) -> list[Path]:
        """What a new start wipes (everything under `root`; the image store is elsewhere)."""
        return [self.containerd_state, self.kubelet_root, self.pod_logs, self.root / "cni"]


def containerd_config(paths: NodePaths, sandbox_image: str) -> str:
    """containerd 1.6's config (TOML, version 2) for a CRI node with runc and the bridge CNI."""
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return "\n".join([
        *_containerd_base_config(paths.containerd_root, paths.containerd_state, paths.containerd_socket,
                                 UNUSABLE_PLUGINS),
        f"[{cri}]",
        f'  sandbox_image = "{sandbox_image}"',
        # This VM does not grant CAP_SYS_RESOURCE: a sandbox's default oom_score_adj is refused.
        "  restrict_oom_score_adj = true",
        # Non-root containers may bind ports below 1024 in their own network namespace (CoreDNS on
        # 53 without any capability), as containerd 2.0 does by default.
        "  enable_unprivileged_ports = true",
        "  enable_unprivileged_icmp = true",
        "  disable_apparmor = true",
        "  max_container_log_line_size = 65536",
        f"[{cri}.containerd]",
        '  snapshotter = "overlayfs"',
        '  default_runtime_name = "runc"',
        f"[{cri}.containerd.runtimes.runc]",
        '  runtime_type = "io.containerd.runc.v2"',
        f"[{cri}.containerd.runtimes.runc.options]",
        f'  BinaryName = "{RUNC}"',
        "  SystemdCgroup = false",
        f"[{cri}.cni]",
        f'  bin_dir = "{CNI_BIN_DIR}"',
        f'  conf_dir = "{paths.cni_conf_dir}"',
        "  max_conf_num = 1",
        # No registry can be reached from this machine: every image is imported.
        f"[{cri}.registry]",
        '  config_path = ""',
        "",
    ])


def kubelet_config(paths: NodePaths, ca_file: Path, serving_cert: Path, serving_key: Path,
                   healthz_port: int) -> dict:
    """KubeletConfiguration of node-0. What this VM needs: cgroup v1 hierarchies (failCgroupV1),
    cgroupfs (no systemd), swap may be on; images are never garbage collected (nothing could pull
    them again) and eviction thresholds are low (a developer's disk, not a fleet's)."""
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": network.NODE_IP,
        "port": KUBELET_PORT,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz_port,
        "tlsCertFile": str(serving_cert),
        "tlsPrivateKeyFile": str(serving_key),
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True, "cacheTTL": "10s"},
            "x509": {"clientCAFile": str(ca_file)},
        },
        "authorization": {"mode": "Webhook"},
        "containerRuntimeEndpoint": f"unix://{paths.containerd_socket}",
        "cgroupDriver": "cgroupfs",
        "failCgroupV1": False,
        "failSwapOn": False,
        "memorySwap": {},
        "clusterDNS": [network.DNS_SERVICE_IP],
        "clusterDomain": network.CLUSTER_DOMAIN,
        # Pods with dnsPolicy Default (CoreDNS itself) get no upstream: nothing off this machine.
        "resolvConf": str(paths.resolv_conf),
        "podLogsDir": str(paths.pod_logs),
        "maxPods": 40,
        "serializeImagePulls": False,
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {"memory.available": "200Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                         "nodefs.inodesFree": "1%"},
        "evictionPressureTransitionPeriod": "30s",
        "enforceNodeAllocatable": ["pods"],
        "nodeStatusUpdateFrequency": "5s",
        "nodeStatusReportFrequency": "30s",
        "syncFrequency": "10s",
        "fileCheckFrequency": "10s",
        "runtimeRequestTimeout": "5m",
        "shutdownGracePeriod": "0s",
        "protectKernelDefaults": False,
        "makeIPTablesUtilChains": False,
        "registerNode": True,
        "registerWithTaints": [NODE_TAINT],
        "rotateCertificates": False,
        "serverTLSBootstrap": False,
        "staticPodPath": "",
        "containerLogMaxSize": "50Mi",
        "containerLogMaxFiles": 2,
    }


def kubelet_argv(binary: Path, paths: NodePaths, kubeconfig: Path) -> list[str]:
    return [
        str(binary),
        f"--config={paths.kubelet_config}",
        f"--kubeconfig={kubeconfig}",
        f"--root-dir={paths.kubelet_root}",
        f"--cert-dir={paths.kubelet_root / 'pki'}",
        f"--hostname-override={NODE_NAME}",
        f"--node-ip={network.NODE_IP}",
        f"--node-labels={POOL_LABEL}={POOL},node.kubernetes.io/instance-type=local-containerd",
        "--v=1",
    ]


def kube_proxy_config(kubeconfig: Path, healthz_port: int, metrics_port: int) -> dict:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "hostnameOverride": NODE_NAME,
        "bindAddress": network.NODE_IP,
        "healthzBindAddress": f"127.0.0.1:{healthz_port}",
        "metricsBindAddress": f"127.0.0.1:{metrics_port}",
        "clusterCIDR": network.CLUSTER_CIDR,
        "mode": "iptables",
        "nodePortAddresses": [f"{network.NODE_IP}/32"],
        # The VM's conntrack table size is the kernel's business, not kube-proxy's.
        "conntrack": {"maxPerCore": 0, "min": 0},
        "iptables": {"masqueradeAll": False, "localhostNodePorts": False, "syncPeriod": "10s",
                     "minSyncPeriod": "1s"},
    }


def kube_router_argv(binary: Path, kubeconfig: Path, health_port: int) -> list[str]:
    """kube-router as the NetworkPolicy engine only: its firewall (iptables + ipset), no BGP
    routing, no service proxy, no CNI (the bridge plugin does that)."""
    return [
        str(binary),
        f"--kubeconfig={kubeconfig}",
        f"--hostname-override={NODE_NAME}",
        "--run-firewall=true",
        "--run-router=false",
        "--run-service-proxy=false",
        "--run-loadbalancer=false",
        "--enable-cni=false",
        f"--service-cluster-ip-range={network.SERVICE_CIDR}",
        f"--service-node-port-range={network.NODE_PORT_RANGE}",
        f"--health-port={health_port}",
        "--metrics-port=0",
        "--iptables-sync-period=30s",
        "--v=1",
    ]


def image_store_config(store: Path, state: Path, socket: Path) -> str:
    """containerd's config for the image store alone, no CRI and no containers: the same root and
    snapshotter (overlayfs, the default) as the node's, so the node finds what it imported unpacked."""
    return "\n".join(_containerd_base_config(store, state, socket, (*UNUSABLE_PLUGINS, "io.containerd.grpc.v1.cri")))


def crictl_config(paths: NodePaths) -> str:
    return (f"runtime-endpoint: unix://{paths.containerd_socket}\n"
            f"image-endpoint: unix://{paths.containerd_socket}\ntimeout: 30\n")


class NodeRuntime:
    """What the harness and the tests do with the node's container runtime directly."""

    def __init__(self, paths: NodePaths, crictl: Path, crictl_config_file: Path):
        self.paths = paths
        self.crictl_binary = crictl
        self.crictl_config_file = crictl_config_file

    def ctr(self, *args: str, check: bool = True, input: bytes | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(["ctr", "--address", str(self.paths.containerd_socket), "--namespace",
                               CONTAINERD_NAMESPACE, *args], capture_output=True, check=check, input=input,
                              timeout=timeout)

    def crictl(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.crictl_binary), f"--config={self.crictl_config_file}", *args],
                              capture_output=True, text=True, check=check, timeout=timeout)

    def image_refs(self) -> set[str]:
        out = self.ctr("images", "ls", "-q", check=False)
        return set(out.stdout.decode().split()) if out.returncode == 0 else set()

    def container_pids(self, namespace: str, pod: str | None = None, container: str | None = None) -> list[int]:
        """Host PIDs of the main processes of the running containers of a pod (or of every pod of
        the namespace), for a test that kills one as the kernel's OOM killer or a crash would."""
        args = ["ps", "-q", "--state", "Running", "--label", f"io.kubernetes.pod.namespace={namespace}"]
        if pod:
            args += ["--label", f"io.kubernetes.pod.name={pod}"]
        if container:
            args += ["--name", f"^{container}$"]
        pids = []
        for container_id in self.crictl(*args).stdout.split():
            info = json.loads(self.crictl("inspect", container_id).stdout)
            pid = (info.get("info") or {}).get("pid")
            if pid:
                pids.append(int(pid))
        return pids

    def remove_all_pods(self, timeout: float = 60) -> None:
        """Stop and remove every pod sandbox (their processes, network namespaces and addresses),
        through the CRI so that the CNI plugin releases what it set up."""
        if not self.paths.containerd_socket.exists():
            return
        pod_ids = self.crictl("pods", "-q", check=False).stdout.split()
        for pod_id in pod_ids:
            self.crictl("stopp", pod_id, check=False, timeout=timeout)
            self.crictl("rmp", "--force", pod_id, check=False, timeout=timeout)


def kill_leftover_shims(paths: NodePaths) -> None:
    """containerd-shim processes of this node (their command line names its containerd socket)
    outlive containerd by design; at cluster-down they go too, with their containers."""
    marker = str(paths.containerd_socket).encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"containerd-shim" in cmdline and marker in cmdline:
            try:
                os.killpg(int(proc.name), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                try:
                    os.kill(int(proc.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass


def unmount_under(root: Path) -> None:
    """Unmount everything mounted below `root` (the kubelet's tmpfs volumes, overlay rootfs of
    containers, network namespaces), deepest first."""
    root_text = str(root.resolve()) if root.exists() else str(root)
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mount_point = line.split()[4].encode().decode("unicode_escape")
        if mount_point == root_text or mount_point.startswith(root_text + "/"):
            mounts.append(mount_point)
    for mount_point in sorted(set(mounts), key=len, reverse=True):
        subprocess.run(["umount", "-l", mount_point], capture_output=True, check=False)


def wait_gone(pids: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.1)
