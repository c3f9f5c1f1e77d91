"""Debian packages the local cluster needs (the real node, Prometheus, the image builds):
installed with apt-get when missing, so a fresh machine needs nothing done by hand."""

from __future__ import annotations

import os
import subprocess

# The real node (containerd, runc, CNI plugins, what kube-proxy and kube-router drive) and the
# image builds (buildah, mmdebstrap, a C compiler for the pause program).
NODE_PACKAGES = ("containerd", "runc", "containernetworking-plugins", "iptables", "ipset", "conntrack",
                 "iproute2")
BUILD_PACKAGES = ("buildah", "mmdebstrap", "gcc", "libc6-dev")
LOCAL_CLUSTER_PACKAGES = NODE_PACKAGES + BUILD_PACKAGES


def missing(packages: tuple[str, ...]) -> list[str]:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${Status}\\n", *packages],
                         capture_output=True, text=True, check=False).stdout
    installed = {line.split()[0] for line in out.splitlines() if line.endswith(" installed")}
    return [p for p in packages if p not in installed]


def ensure_packages(packages: tuple[str, ...], log=print) -> None:
    needed = missing(packages)
    if not needed:
        return
    log(f"installing Debian packages: {' '.join(needed)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *needed], check=True, env=env)
