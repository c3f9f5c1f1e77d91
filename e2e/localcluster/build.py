"""Build the local cluster's binaries from Go modules, cached by version.

Each component is built inside a small helper module (in the cache) that requires the upstream
module at a pinned version, so `go build` resolves exactly the dependencies upstream tested.
A finished binary is never rebuilt: the cache folder is keyed by component and version.

    python -m e2e.localcluster.build [component ...]
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from . import versions
from .paths import cache_dir


@dataclasses.dataclass(frozen=True)
class GoComponent:
    name: str
    module: str
    version: str
    # binary name -> Go package path
    binaries: dict[str, str]
    ldflags: str = ""
    extra_go_mod: str = ""
    # `go get module@version` run after the upstream module is resolved (dependency upgrades).
    upgrades: tuple[str, ...] = ()
    # A main package of our own in the helper module (binaries then map to "."), for a build with
    # only some of upstream's packages linked in.
    main_go: str = ""
    tags: str = ""
    # Our own main package kept in the repository (e2e/runtimes/<name>/main.go).
    main_go_file: Path | None = None

    @property
    def main_source(self) -> str:
        return self.main_go_file.read_text() if self.main_go_file else self.main_go

    @property
    def cache_key(self) -> str:
        """The version, and a hash of our own main package where there is one, so an edited one is rebuilt."""
        if not self.main_source:
            return self.version
        return f"{self.version}-{hashlib.sha256(self.main_source.encode()).hexdigest()[:12]}"

    @property
    def bin_dir(self) -> Path:
        return cache_dir() / "bin" / f"{self.name}-{self.cache_key}"

    def binary(self, binary_name: str) -> Path:
        return self.bin_dir / binary_name

    def module_dir(self) -> Path:
        """The module's source in the Go module cache (present once it was built here)."""
        gomodcache = subprocess.run(["go", "env", "GOMODCACHE"], capture_output=True, text=True, check=True).stdout.strip()
        path = Path(gomodcache) / f"{self.module}@{self.version}"
        if not path.exists():
            subprocess.run(["go", "mod", "download", f"{self.module}@{self.version}"], env=_go_env(), check=True,
                           cwd=cache_dir())
        return path

    def is_built(self) -> bool:
        return all(self.binary(b).exists() for b in self.binaries)


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(CGO_ENABLED="0", GOTOOLCHAIN="local", GOFLAGS="-mod=mod")
    return env


def _upstream_go_mod(module: str, version: str) -> str:
    proxy = os.environ.get("GOPROXY", "https://proxy.golang.org").split(",")[0]
    url = f"{proxy}/{module.lower()}/@v/{version}.mod"
    with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 - the Go module proxy
        return response.read().decode()


def kubernetes_staging_replaces(go_mod: str, staging_version: str) -> list[str]:
    """`replace k8s.io/x => k8s.io/x v0.N.M` for every staging module the kubernetes go.mod replaces
    with a local ./staging path (those local paths do not exist for a dependent module)."""
    staging = sorted(set(re.findall(r"^\s*(k8s\.io/[\w.-]+)\s+=>\s+\./staging/", go_mod, re.M)))
    return [f"replace {m} => {m} {staging_version}" for m in staging]


def _kubernetes_ldflags() -> str:
    major, minor = versions.KUBERNETES[1:].split(".")[:2]
    pkg = "k8s.io/component-base/version"
    return " ".join(
        [
            "-s -w",
            f"-X {pkg}.gitVersion={versions.KUBERNETES}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
            f"-X {pkg}.buildDate=1970-01-01T00:00:00Z",
            f"-X k8s.io/client-go/pkg/version.gitVersion={versions.KUBERNETES}",
        ]
    )


KUBERNETES = GoComponent(
    name="kubernetes",
    module="k8s.io/kubernetes",
    version=versions.KUBERNETES,
    binaries={
        "kube-apiserver": "k8s.io/kubernetes/cmd/kube-apiserver",
        "kube-controller-manager": "k8s.io/kubernetes/cmd/kube-controller-manager",
        "kube-scheduler": "k8s.io/kubernetes/cmd/kube-scheduler",
        "kubectl": "k8s.io/kubernetes/cmd/kubectl",
        # The real node (e2e/localcluster/node.py).
        "kubelet": "k8s.io/kubernetes/cmd/kubelet",
        "kube-proxy": "k8s.io/kubernetes/cmd/kube-proxy",
    },
    ldflags=_kubernetes_ldflags(),
)
ETCD = GoComponent(
    name="etcd",
    module="go.etcd.io/etcd/server/v3",
    version=versions.ETCD,
    binaries={"etcd": "go.etcd.io/etcd/server/v3"},
    ldflags="-s -w",
)
TRAINING_OPERATOR = GoComponent(
    name="training-operator",
    module="github.com/kubeflow/training-operator",
    version=versions.TRAINING_OPERATOR,
    binaries={"training-operator": "github.com/kubeflow/training-operator/cmd/training-operator.v1"},
    ldflags="-s -w",
)
KWOK = GoComponent(
    name="kwok",
    module="sigs.k8s.io/kwok",
    version=versions.KWOK,
    binaries={"kwok": "sigs.k8s.io/kwok/cmd/kwok"},
    ldflags=f"-s -w -X sigs.k8s.io/kwok/pkg/consts.Version={versions.KWOK}",
)
KUEUE = GoComponent(
    name="kueue",
    module="sigs.k8s.io/kueue",
    version=versions.KUEUE,
    binaries={"kueue": "sigs.k8s.io/kueue/cmd/kueue"},
    # Kueue's Makefile stamps the git tag, commit and build date; a module has no git commit.
    ldflags=" ".join(["-s -w", f"-X sigs.k8s.io/kueue/pkg/version.GitVersion={versions.KUEUE}",
                      "-X sigs.k8s.io/kueue/pkg/version.GitCommit=module",
                      f"-X sigs.k8s.io/kueue/pkg/version.BuildDate={versions.KUEUE_RELEASE_DATE}"]),
)

HELM = GoComponent(
    name="helm",
    module="helm.sh/helm/v3",
    version=versions.HELM,
    binaries={"helm": "helm.sh/helm/v3/cmd/helm"},
    ldflags=" ".join(
        [
            "-s -w",
            f"-X helm.sh/helm/v3/internal/version.version={versions.HELM}",
            "-X helm.sh/helm/v3/internal/version.gitTreeState=clean",
            *(f"-X helm.sh/helm/v3/pkg/{pkg}.k8sVersionMajor=1" for pkg in ("lint/rules", "chartutil")),
            *(f"-X helm.sh/helm/v3/pkg/{pkg}.k8sVersionMinor={versions.HELM_KUBE_MINOR}" for pkg in ("lint/rules", "chartutil")),
        ]
    ),
)

# Cluster DNS: CoreDNS with the plugins the local cluster's Corefile uses (addons.COREFILE).
COREDNS_PLUGINS = ("cache", "errors", "health", "kubernetes", "loadbalance", "metrics", "ready")
COREDNS = GoComponent(
    name="coredns",
    module="github.com/coredns/coredns",
    version=versions.COREDNS,
    binaries={"coredns": "."},
    ldflags="-s -w",
    main_go="\n".join([
        "// CoreDNS with only the plugins the local cluster's DNS uses (generated by e2e/localcluster/build.py).",
        "package main",
        "",
        "import (",
        '\t"github.com/coredns/coredns/coremain"',
        *(f'\t_ "github.com/coredns/coredns/plugin/{plugin}"' for plugin in COREDNS_PLUGINS),
        ")",
        "",
        "func main() { coremain.Run() }",
        "",
    ]),
)
# NetworkPolicy enforcement: kube-router run with only its firewall (iptables + ipset).
KUBE_ROUTER = GoComponent(
    name="kube-router",
    module="github.com/cloudnativelabs/kube-router/v2",
    version=versions.KUBE_ROUTER,
    binaries={"kube-router": "github.com/cloudnativelabs/kube-router/v2/cmd/kube-router"},
    ldflags=f"-s -w -X github.com/cloudnativelabs/kube-router/v2/pkg/version.Version={versions.KUBE_ROUTER}",
    upgrades=versions.KUBE_ROUTER_UPGRADES,
)
CRI_TOOLS = GoComponent(
    name="cri-tools",
    module="sigs.k8s.io/cri-tools",
    version=versions.CRI_TOOLS,
    binaries={"crictl": "sigs.k8s.io/cri-tools/cmd/crictl"},
    ldflags=f"-s -w -X sigs.k8s.io/cri-tools/pkg/version.Version={versions.CRI_TOOLS}",
)

# Metrics: Prometheus with Kubernetes, file and static discovery only (its remove_all_sd build tag).
PROMETHEUS = GoComponent(
    name="prometheus",
    module="github.com/prometheus/prometheus",
    version=versions.PROMETHEUS,
    binaries={"prometheus": "github.com/prometheus/prometheus/cmd/prometheus",
              "promtool": "github.com/prometheus/prometheus/cmd/promtool"},
    ldflags=" ".join(["-s -w", f"-X github.com/prometheus/common/version.Version={versions.PROMETHEUS_RELEASE}",
                      "-X github.com/prometheus/common/version.Branch=release",
                      "-X github.com/prometheus/common/version.Revision=module"]),
    tags="remove_all_sd,enable_kubernetes_sd",
)

# The runtimes our integrations meet, as small harnesses of our own (e2e/runtimes/): Argo CD's Lua VM
# (gopher-lua with the libraries Argo CD opens) and kstatus (sigs.k8s.io/cli-utils), used by the tests.
RUNTIMES = Path(__file__).resolve().parents[1] / "runtimes"


def _harness(name: str, module: str, version: str) -> GoComponent:
    """A harness of ours: e2e/runtimes/<name>/main.go built against the upstream module."""
    return GoComponent(name=name, module=module, version=version, binaries={name: "."}, ldflags="-s -w",
                       main_go_file=RUNTIMES / name / "main.go")


ARGOCD_LUA = _harness("argocd-lua", "github.com/yuin/gopher-lua", versions.GOPHER_LUA)
KSTATUS = _harness("kstatus", "sigs.k8s.io/cli-utils", versions.CLI_UTILS)

COMPONENTS = {c.name: c for c in (ETCD, KUBERNETES, TRAINING_OPERATOR, KUEUE, KWOK, HELM, COREDNS, KUBE_ROUTER,
                                  CRI_TOOLS, PROMETHEUS, ARGOCD_LUA, KSTATUS)}


def _helper_module_text(component: GoComponent) -> str:
    lines = [
        f"module local.build/{component.name}",
        "",
        "go 1.23",
        "",
        f"require {component.module} {component.version}",
        "",
    ]
    if component is KUBERNETES:
        upstream = _upstream_go_mod(component.module, component.version)
        lines += kubernetes_staging_replaces(upstream, versions.KUBERNETES_STAGING)
    return "\n".join(lines) + "\n" + component.extra_go_mod


def resolve(component: GoComponent, log=print) -> Path:
    """Write the component's helper module and resolve it (`go get`, downloading what the module
    cache lacks); returns the module's folder. Mostly network: `main` runs the next components'
    resolves while one compiles."""
    work = cache_dir() / "src" / f"{component.name}-{component.cache_key}"
    work.mkdir(parents=True, exist_ok=True)
    (work / "go.mod").write_text(_helper_module_text(component))
    if component.main_source:
        (work / "main.go").write_text(component.main_source)
    env = _go_env()
    # `go get` of every package records the whole dependency graph in go.mod/go.sum.
    packages = [p for p in component.binaries.values() if p != "."] or [component.module]
    log(f"{component.name} {component.version}: resolving modules")
    subprocess.run(["go", "get", *[f"{p}@{component.version}" for p in packages]], cwd=work, env=env, check=True)
    if component.upgrades:
        log(f"{component.name} {component.version}: upgrading {' '.join(component.upgrades)}")
        subprocess.run(["go", "get", *component.upgrades], cwd=work, env=env, check=True)
    return work


def build(component: GoComponent, log=print, resolved: Callable[[], Path] | None = None) -> None:
    """Build the component's binaries that are not in the cache yet (a new binary added to a
    component is built alone; the ones already there are kept). `resolved` waits for a `resolve`
    started elsewhere; without it the module is resolved here."""
    missing = [name for name in component.binaries if not component.binary(name).exists()]
    if not missing:
        log(f"{component.name} {component.version}: cached in {component.bin_dir}")
        return
    work = resolved() if resolved is not None else resolve(component, log)
    env = _go_env()
    component.bin_dir.mkdir(parents=True, exist_ok=True)
    for binary_name in missing:
        package = component.binaries[binary_name]
        log(f"{component.name} {component.version}: go build {package}")
        partial = component.binary(binary_name).with_name(binary_name + ".partial")
        subprocess.run(
            ["go", "build", "-trimpath", f"-tags={component.tags}", "-ldflags", component.ldflags,
             "-o", str(partial), package],
            cwd=work, env=env, check=True,
        )
        partial.rename(component.binary(binary_name))
    log(f"{component.name} {component.version}: built into {component.bin_dir}")
    if component.main_go_file is not None:  # builds of earlier versions of our harness are dead weight
        for stale in (cache_dir() / "bin").glob(f"{component.name}-{component.version}-*"):
            if stale != component.bin_dir:
                shutil.rmtree(stale, ignore_errors=True)


def main(argv: list[str]) -> int:
    """`python3 -m e2e.localcluster.build [component ...]`; with no argument everything the local
    cluster needs: its Debian packages, every Go component and every image (`make cluster-build`)."""
    if argv:
        for name in argv:
            build(COMPONENTS[name])
        return 0
    from . import debian, images

    debian.ensure_packages(debian.LOCAL_CLUSTER_PACKAGES)
    # Three streams: the Go builds (CPU), the modules they need resolved and downloaded ahead of them
    # (network), and the image builds (mostly downloads), which then import the images into the
    # node's image store; the CoreDNS image, which needs the CoreDNS binary, comes last.
    with ThreadPoolExecutor(max_workers=1) as resolver, ThreadPoolExecutor(max_workers=2) as pool:
        resolves = {c.name: resolver.submit(resolve, c) for c in COMPONENTS.values() if not c.is_built()}

        def build_all() -> None:
            for component in COMPONENTS.values():
                ahead = resolves.get(component.name)
                build(component, resolved=ahead.result if ahead is not None else None)

        def images_into_store() -> None:
            for spec in images.IMAGES.values():
                images.ensure_built(spec)
            images.preload_node_store(list(images.IMAGES.values()))

        go_builds = pool.submit(build_all)
        image_builds = pool.submit(images_into_store)
        try:
            go_builds.result()
            image_builds.result()
        finally:  # a failed build does not wait for the resolves still queued
            resolver.shutdown(wait=False, cancel_futures=True)
    images.ensure_built(images.coredns_spec(COREDNS.binary("coredns")))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
