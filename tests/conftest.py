"""Fixtures for the unit tier: a real S3-compatible server on loopback (moto, as its own process)."""

from __future__ import annotations

import os
import uuid

import pytest

from e2e.localcluster import s3 as local_s3
from e2e.localcluster.procs import free_port


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """Endpoint URL of an S3 server started for this test session; credentials are in the env."""
    port = free_port()
    log = tmp_path_factory.mktemp("s3") / "s3.log"
    proc = local_s3.start_s3_server(port, log)
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID=local_s3.ACCESS_KEY, AWS_SECRET_ACCESS_KEY=local_s3.SECRET_KEY,
                      AWS_DEFAULT_REGION=local_s3.REGION)
    yield endpoint
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh bucket per test: (boto3 client, bucket name)."""
    client = local_s3.client(s3_endpoint)
    name = f"t-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return client, name
