"""Build the local cluster's binaries from Go modules, cached by version.

Each component is built inside a small helper module (in the cache) that requires the upstream
module at a pinned version, so `go build` resolves exactly the dependencies upstream tested.
A finished binary is never rebuilt: the cache folder is keyed by component and version.

    python -m e2e.localcluster.build [component ...]
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

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

    @property
    def bin_dir(self) -> Path:
        return cache_dir() / "bin" / f"{self.name}-{self.version}"

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

COMPONENTS = {c.name: c for c in (ETCD, KUBERNETES, TRAINING_OPERATOR, KWOK, HELM)}


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


def build(component: GoComponent, log=print) -> None:
    if component.is_built():
        log(f"{component.name} {component.version}: cached in {component.bin_dir}")
        return
    work = cache_dir() / "src" / f"{component.name}-{component.version}"
    work.mkdir(parents=True, exist_ok=True)
    (work / "go.mod").write_text(_helper_module_text(component))
    env = _go_env()
    # `go get` of every package records the whole dependency graph in go.mod/go.sum.
    packages = list(component.binaries.values())
    log(f"{component.name} {component.version}: resolving modules")
    subprocess.run(["go", "get", *[f"{p}@{component.version}" for p in packages]], cwd=work, env=env, check=True)
    tmp_bin = component.bin_dir.with_name(component.bin_dir.name + ".partial")
    shutil.rmtree(tmp_bin, ignore_errors=True)
    tmp_bin.mkdir(parents=True)
    for binary_name, package in component.binaries.items():
        log(f"{component.name} {component.version}: go build {package}")
        subprocess.run(
            ["go", "build", "-trimpath", "-ldflags", component.ldflags, "-o", str(tmp_bin / binary_name), package],
            cwd=work, env=env, check=True,
        )
    shutil.rmtree(component.bin_dir, ignore_errors=True)
    tmp_bin.rename(component.bin_dir)
    log(f"{component.name} {component.version}: built into {component.bin_dir}")


def main(argv: list[str]) -> int:
    names = argv or list(COMPONENTS)
    for name in names:
        build(COMPONENTS[name])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
