"""S3 access: credentials from the standard AWS_* environment, endpoint and region from the config.

Only the tenant's credentials are used: they are handed to the client explicitly, so the AWS SDK's
provider chain (instance metadata, web identity, ~/.aws) is never consulted; missing or empty ones
end the run as a configuration error instead of borrowing the node's identity.

Every call goes through botocore's retrying client; what still fails is raised as StorageError
(retryable) unless the object simply does not exist, which is the caller's business.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import ConfigError, StorageError


def tenant_credentials(env: dict[str, str] | None = None) -> dict[str, str | None]:
    """The tenant's S3 credentials from the environment, as keyword arguments of boto3.client."""
    env = dict(os.environ) if env is None else env
    key, secret = (env.get("AWS_ACCESS_KEY_ID") or "").strip(), (env.get("AWS_SECRET_ACCESS_KEY") or "").strip()
    if not key or not secret:
        raise ConfigError("no S3 credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set and non-empty "
                          "(the trainer never falls back to the node's identity)")
    token = (env.get("AWS_SESSION_TOKEN") or "").strip() or None
    return {"aws_access_key_id": key, "aws_secret_access_key": secret, "aws_session_token": token}


def parse_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


def join(prefix: str, name: str) -> str:
    return (prefix if prefix.endswith("/") else prefix + "/") + name


class NotFound(Exception):
    pass


class Storage:
    def __init__(self, endpoint: str = "", region: str = "us-east-1", max_attempts: int = 8,
                 credentials: dict[str, str | None] | None = None):
        import boto3
        from botocore.config import Config

        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint or None,
            region_name=region,
            **(credentials if credentials is not None else tenant_credentials()),
            config=Config(
                retries={"max_attempts": max_attempts, "mode": "standard"},
                s3={"addressing_style": "path"} if endpoint else {},
                connect_timeout=10,
                read_timeout=60,
            ),
        )

    def _call(self, what: str, fn, *args, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound", "NoSuchBucket"):
                raise NotFound(what) from e
            raise StorageError(f"S3 {what}: {e}") from e
        except BotoCoreError as e:
            raise StorageError(f"S3 {what}: {e}") from e

    # ---- reading ----

    def list_keys(self, uri: str) -> list[str]:
        """Keys under a prefix (sorted), as s3:// URIs."""
        bucket, prefix = parse_uri(uri)
        paginator = self.client.get_paginator("list_objects_v2")
        uris: list[str] = []

        def collect():
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                uris.extend(f"s3://{bucket}/{o['Key']}" for o in page.get("Contents", []))

        self._call(f"list {uri}", collect)
        return sorted(uris)

    def exists(self, uri: str) -> bool:
        bucket, key = parse_uri(uri)
        try:
            self._call(f"head {uri}", self.client.head_object, Bucket=bucket, Key=key)
            return True
        except NotFound:
            return False

    def get_bytes(self, uri: str) -> bytes:
        bucket, key = parse_uri(uri)
        body = self._call(f"get {uri}", self.client.get_object, Bucket=bucket, Key=key)["Body"]
        return self._call(f"read {uri}", body.read)

    def get_json(self, uri: str) -> Any | None:
        try:
            return json.loads(self.get_bytes(uri))
        except NotFound:
            return None

    def iter_lines(self, uri: str) -> Iterator[bytes]:
        """Lines of an object, streamed (a .gz object is decompressed on the fly)."""
        bucket, key = parse_uri(uri)
        body = self._call(f"get {uri}", self.client.get_object, Bucket=bucket, Key=key)["Body"]
        try:
            if key.endswith(".gz"):
                yield from io.BufferedReader(gzip.GzipFile(fileobj=body), buffer_size=1 << 20)
            else:
                yield from body.iter_lines(chunk_size=1 << 20)
        finally:
            body.close()

    def download_prefix(self, uri: str, local_dir: Path) -> list[Path]:
        """Copy every object under a prefix into local_dir, keeping relative paths."""
        bucket, prefix = parse_uri(uri if uri.endswith("/") else uri + "/")
        files = []
        for object_uri in self.list_keys(f"s3://{bucket}/{prefix}"):
            relative = parse_uri(object_uri)[1][len(prefix):]
            if not relative or relative.endswith("/"):
                continue
            target = local_dir / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            self._call(f"download {object_uri}", self.client.download_file, bucket, parse_uri(object_uri)[1], str(target))
            files.append(target)
        return files

    # ---- writing ----

    def put_bytes(self, uri: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        bucket, key = parse_uri(uri)
        self._call(f"put {uri}", self.client.put_object, Bucket=bucket, Key=key, Body=data, ContentType=content_type)

    def put_json(self, uri: str, document: Any) -> None:
        self.put_bytes(uri, json.dumps(document, indent=2, sort_keys=True).encode(), "application/json")

    def upload_file(self, path: Path, uri: str) -> None:
        bucket, key = parse_uri(uri)
        self._call(f"upload {uri}", self.client.upload_file, str(path), bucket, key)

    def upload_dir(self, local_dir: Path, uri: str) -> list[str]:
        uploaded = []
        for path in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
            target = join(uri, path.relative_to(local_dir).as_posix())
            self.upload_file(path, target)
            uploaded.append(target)
        return uploaded

    def delete_prefix(self, uri: str) -> None:
        bucket, _ = parse_uri(uri)
        keys = [parse_uri(u)[1] for u in self.list_keys(uri)]
        for start in range(0, len(keys), 1000):
            chunk = [{"Key": k} for k in keys[start:start + 1000]]
            self._call(f"delete {uri}", self.client.delete_objects, Bucket=bucket, Delete={"Objects": chunk})


def from_config(storage_config) -> Storage:
    endpoint = storage_config.endpoint or os.environ.get("AWS_ENDPOINT_URL_S3", "") or os.environ.get("AWS_ENDPOINT_URL", "")
    return Storage(endpoint=endpoint, region=storage_config.region)
