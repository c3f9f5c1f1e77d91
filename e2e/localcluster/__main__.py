"""CLI of the local cluster: python -m e2e.localcluster {up|down|status|build}."""

from __future__ import annotations

import argparse
import sys
import time

from . import build
from .cluster import LocalCluster


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.localcluster")
    parser.add_argument("command", choices=["up", "down", "status", "build", "logs", "operator-up", "operator-down",
                                            "operator-install", "operator-uninstall"])
    parser.add_argument("target", nargs="*", help="logs: NAMESPACE POD [CONTAINER]")
    args = parser.parse_args(argv)
    cluster = LocalCluster()
    if args.command == "build":
        return build.main([])
    if args.command in ("operator-install", "operator-uninstall"):
        from .operator_release import OperatorRelease

        release = OperatorRelease(cluster)
        release.up() if args.command == "operator-install" else release.down()
        return 0
    if args.command in ("operator-up", "operator-down"):
        from .operator_process import OperatorProcess

        operator = OperatorProcess(cluster)
        operator.up() if args.command == "operator-up" else operator.down()
        return 0
    if args.command == "logs":
        return _logs(cluster, *args.target)
    if args.command == "up":
        cluster.up()
        print("\n".join(cluster.status_lines()))
        print("\nTry:  .cluster/bin/kubectl --kubeconfig .cluster/kubeconfig get nodes -L finetune.dev/pool")
        return 0
    if args.command == "down":
        from .operator_process import OperatorProcess

        OperatorProcess(cluster).down()
        cluster.down()
        left: list[str] = []
        deadline = time.monotonic() + 30  # processes killed a moment ago may still be exiting
        while time.monotonic() < deadline and (left := cluster.leftovers()):
            time.sleep(1)
        if left:
            print("local cluster stopped, but these are left behind:\n  " + "\n  ".join(left), file=sys.stderr)
            return 1
        print("local cluster stopped; nothing of it is left behind")
        return 0
    print("\n".join(cluster.status_lines()))
    return 0 if cluster.is_running() else 1


def _logs(cluster: LocalCluster, namespace: str = "", pod: str = "", container: str = "") -> int:
    """Output of a pod on the real node (all its containers unless one is named)."""
    if not namespace or not pod:
        print("usage: python -m e2e.localcluster logs NAMESPACE POD [CONTAINER]", file=sys.stderr)
        return 2
    which = ["-c", container] if container else ["--all-containers", "--prefix"]
    out = cluster.kubectl("logs", "-n", namespace, pod, *which, check=False)
    sys.stdout.write(out.stdout)
    sys.stderr.write(out.stderr)
    return out.returncode


if __name__ == "__main__":
    sys.exit(main())
