"""`python -m finetune_operator --config operator/config/dev.yaml`: run the operator.

Watches FineTuneJobs cluster-wide (or in --namespace ones), serves Prometheus metrics on
OperatorConfig.operatorMetricsPort and kopf's liveness probe on livenessPort at /healthz.
Kubernetes credentials: in-cluster service account, else $KUBECONFIG / ~/.kube/config.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys

import kopf

from finetune_operator import redact
from finetune_operator.config import OperatorConfig
from finetune_operator.handlers import register


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="finetune_operator", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.environ.get("FINETUNE_OPERATOR_CONFIG", "/etc/finetune-operator/config.yaml"),
                        help="OperatorConfig YAML (env FINETUNE_OPERATOR_CONFIG)")
    parser.add_argument("--namespace", action="append", default=[],
                        help="watch only this namespace (repeatable); default: cluster-wide")
    parser.add_argument("--s3-endpoint", default=os.environ.get("FINETUNE_S3_ENDPOINT"),
                        help="override OperatorConfig.s3Endpoint (env FINETUNE_S3_ENDPOINT), e.g. the local S3's random port")
    parser.add_argument("--verbose", action="store_true")
    return parser.parse_args(argv)


def operator_identity() -> str:
    """Who this operator is in kopf's records: the pod's name (its hostname) and PID. kopf's own
    default asks the password database for the user name, which fails for a numeric non-root user
    without an entry there (every hardened image)."""
    return f"{socket.gethostname()}/{os.getpid()}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = OperatorConfig.load(args.config)
    if args.s3_endpoint:
        cfg = cfg.model_copy(update={"s3Endpoint": args.s3_endpoint})
    kopf.configure(verbose=args.verbose)  # sets up logging
    for noisy in ("httpx", "httpx2"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    redact.install()  # botocore and urllib3 stay at WARNING: their DEBUG logs carry credentials
    registry = kopf.OperatorRegistry()
    register(registry, cfg)
    asyncio.run(kopf.operator(
        registry=registry,
        standalone=True,
        identity=operator_identity(),
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=f"http://0.0.0.0:{cfg.livenessPort}/healthz",
    ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
