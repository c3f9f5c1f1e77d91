"""The local S3-compatible server: moto in server mode, as a separate process on loopback.

(MinIO from its Go module was the first choice; see README "Local control plane" for why moto.)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .procs import http_ok, start_logged, wait_until

ACCESS_KEY = "finetune-local"
SECRET_KEY = "finetune-local-secret"
REGION = "us-east-1"


def start_s3_server(port: int, log_file: Path, host: str = "127.0.0.1") -> subprocess.Popen:
    proc = start_logged([sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)], log_file)
    endpoint = f"http://{host}:{port}"
    wait_until(lambda: http_ok(f"{endpoint}/moto-api/"), 60, f"S3 server on {endpoint}", proc=proc, log_file=log_file)
    return proc


def client(endpoint: str):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name=REGION,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 5, "mode": "standard"}),
    )
