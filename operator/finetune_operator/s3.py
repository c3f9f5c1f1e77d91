"""Reading the trainer's documents and checking inputs in S3, with the tenant's own credentials.

boto3 is synchronous: the reconcile calls these functions through `asyncio.to_thread`. Every
function returns values, never raises for storage problems: a missing or malformed document is
None (and logged), an unreachable endpoint is an S3Check with exists=None.
"""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import dataclass
from typing import Any, TypeVar

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import BaseModel, ValidationError

from finetune_operator.validation import S3Check
from finetune_trainer.config import EvaluationResult, Progress, RunResult, evaluation_uri, progress_uri, result_uri

log = logging.getLogger(__name__)
D = TypeVar("D", bound=BaseModel)
MAX_DOCUMENT_BYTES = 1 << 20
_NOT_FOUND = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str
    session_token: str | None = None

    @classmethod
    def from_secret_data(cls, data: dict[str, str]) -> "Credentials":
        def dec(key: str) -> str | None:
            return base64.b64decode(data[key]).decode() if key in data else None

        return cls(dec("AWS_ACCESS_KEY_ID") or "", dec("AWS_SECRET_ACCESS_KEY") or "", dec("AWS_SESSION_TOKEN"))


def split_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri}")
    bucket, _, key = uri[5:].partition("/")
    return bucket, key


def client(endpoint: str, region: str, creds: Credentials) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint or None,
        region_name=region,
        aws_access_key_id=creds.access_key,
        aws_secret_access_key=creds.secret_key,
        aws_session_token=creds.session_token,
        config=BotoConfig(connect_timeout=3, read_timeout=5, retries={"max_attempts": 1},
                          s3={"addressing_style": "path"}),
    )


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def read_document(s3: Any, uri: str, model: type[D]) -> D | None:
    """A trainer document, or None when absent, too large or malformed."""
    bucket, key = split_uri(uri)
    try:
        obj = s3.get_object(Bucket=bucket, Key=key)
        if int(obj.get("ContentLength") or 0) > MAX_DOCUMENT_BYTES:
            log.warning("ignoring %s: larger than %d bytes", uri, MAX_DOCUMENT_BYTES)
            return None
        body = obj["Body"].read(MAX_DOCUMENT_BYTES + 1)
    except ClientError as exc:
        if _error_code(exc) not in _NOT_FOUND:
            log.warning("cannot read %s: %s", uri, exc)
        return None
    except BotoCoreError as exc:
        log.warning("cannot read %s: %s", uri, exc)
        return None
    try:
        return model.model_validate(json.loads(body))
    except (ValueError, ValidationError) as exc:
        log.warning("ignoring malformed %s: %s", uri, str(exc)[:300])
        return None


@dataclass
class RunDocuments:
    progress: Progress | None = None
    evaluation: EvaluationResult | None = None
    result: RunResult | None = None


def read_run_documents(s3: Any, output_uri: str, run_id: str) -> RunDocuments:
    return RunDocuments(
        progress=read_document(s3, progress_uri(output_uri, run_id), Progress),
        evaluation=read_document(s3, evaluation_uri(output_uri, run_id), EvaluationResult),
        result=read_document(s3, result_uri(output_uri, run_id), RunResult),
    )


def check_uri(s3: Any, uri: str) -> S3Check:
    """Does `uri` name an object, or a prefix with at least one object under it?"""
    bucket, key = split_uri(uri)
    try:
        if key and not key.endswith("/"):
            try:
                s3.head_object(Bucket=bucket, Key=key)
                return S3Check(True)
            except ClientError as exc:
                if _error_code(exc) not in _NOT_FOUND:
                    raise
            key += "/"
        listing = s3.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
        return S3Check(bool(listing.get("KeyCount") or listing.get("Contents")))
    except ClientError as exc:
        code = _error_code(exc)
        if code in _NOT_FOUND:
            return S3Check(False)
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return S3Check(False, code)
        return S3Check(None, code or str(exc))
    except BotoCoreError as exc:
        return S3Check(None, str(exc)[:300])


def check_uris(s3: Any, uris: dict[str, str]) -> dict[str, S3Check]:
    return {path: check_uri(s3, uri) for path, uri in uris.items()}
