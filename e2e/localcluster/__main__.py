"""CLI of the local cluster: python -m e2e.localcluster {up|down|status|build}."""

from __future__ import annotations

import argparse
import sys

from . import build
from .cluster import LocalCluster


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.localcluster")
    parser.add_argument("command", choices=["up", "down", "status", "build", "logs", "operator-up", "operator-down"])
    parser.add_argument("target", nargs="*", help="logs: NAMESPACE POD [CONTAINER]")
    args = parser.parse_args(argv)
    cluster = LocalCluster()
    if args.command == "build":
        return build.main([])
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
        print("local cluster stopped")
        return 0
    print("\n".join(cluster.status_lines()))
    return 0 if cluster.is_running() else 1


def _logs(cluster: LocalCluster, namespace: str = "", pod: str = "", container: str = "") -> int:
    """Output of a pod run by the local node runtime (all its containers unless one is named)."""
    if not namespace or not pod:
        print("usage: python -m e2e.localcluster logs NAMESPACE POD [CONTAINER]", file=sys.stderr)
        return 2
    folder = cluster.pods_dir / namespace / pod
    files = sorted(folder.glob(f"{container or '*'}.log"))
    if not files:
        print(f"no output kept for pod {namespace}/{pod} (looked in {folder})", file=sys.stderr)
        return 1
    for file in files:
        if len(files) > 1:
            print(f"==> {file.stem} <==")
        sys.stdout.write(file.read_text(errors="replace"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
