"""CLI of the local cluster: python -m e2e.localcluster {up|down|status|build}."""

from __future__ import annotations

import argparse
import sys

from . import build
from .cluster import LocalCluster


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.localcluster")
    parser.add_argument("command", choices=["up", "down", "status", "build"])
    args = parser.parse_args(argv)
    cluster = LocalCluster()
    if args.command == "build":
        return build.main([])
    if args.command == "up":
        cluster.up()
        print("\n".join(cluster.status_lines()))
        print("\nTry:  .cluster/bin/kubectl --kubeconfig .cluster/kubeconfig get nodes -L finetune.dev/pool")
        return 0
    if args.command == "down":
        cluster.down()
        print("local cluster stopped")
        return 0
    print("\n".join(cluster.status_lines()))
    return 0 if cluster.is_running() else 1


if __name__ == "__main__":
    sys.exit(main())
