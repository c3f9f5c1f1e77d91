"""Reading the trainer's documents and checking inputs in S3, with the tenant's own credentials.

Every byte a tenant's endpoint sends is hostile: each HTTP exchange has a deadline over all of it
(connect, headers, a body sent one byte at a time) and a cap on the body, read in chunks
(`BoundedHTTP`, botocore's `before-send` hook); a whole input check has a time budget. boto3 is
synchronous: the reconcile runs these functions in its bounded, tenant-fair executor
(tenant_io.py). Every function returns values, never raises for storage problems: a missing or
malformed document is None (and logged), an unreachable endpoint is an S3Check with exists=None.
Whatever text an answer carries (an error code, a message, an exception about it) is cut and
escaped (`server_text`) before it is stored or logged. No request leaves without a `Dial` that says
where it may connect: a tenant's wildcard endpoint only at the addresses this pass resolved and judged.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import logging
import os
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import boto3
from botocore.awsrequest import AWSResponse
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError, ReadTimeoutError
from botocore.httpsession import get_cert_path
from pydantic import BaseModel, ValidationError

from finetune_operator.validation import S3Check
from finetune_trainer.config import EvaluationResult, Progress, RunResult, evaluation_uri, progress_uri, result_uri

log = logging.getLogger(__name__)
D = TypeVar("D", bound=BaseModel)
MAX_DOCUMENT_BYTES = 1 << 20
# Any response body the operator reads (a listing with MaxKeys=1, an error document, a trainer
# document) fits in this; a longer one is cut off and the call fails.
MAX_RESPONSE_BYTES = MAX_DOCUMENT_BYTES + (64 << 10)
REQUEST_DEADLINE_SECONDS = 10.0
CHECK_BUDGET_SECONDS = 30.0
_NOT_FOUND = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}
_CHUNK = 16 << 10
# What a server said, kept: an error code or message at most this long, a whole error text at most
# MAX_ERROR_TEXT (it names the URI too).
MAX_SERVER_TEXT = 128
MAX_ERROR_TEXT = 300


def server_text(value: object, limit: int = MAX_SERVER_TEXT) -> str:
    """Text a server chose (or an exception quoting it), fit to store, log or show: at most `limit`
    characters, every non-printable one escaped (no forged log lines, no terminal or bidi controls)."""
    text = value if isinstance(value, str) else str(value)
    escaped = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text[:limit + 1])
    return escaped if len(escaped) <= limit else escaped[:limit - 3] + "..."


def describe(exc: BaseException) -> str:
    """An exception about an endpoint's answer, as server_text: for an S3 error, its code and message."""
    if isinstance(exc, ClientError):
        message = server_text((exc.response.get("Error") or {}).get("Message", ""))
        return ": ".join(part for part in (_error_code(exc), message) if part) or "an S3 error without a code"
    return server_text(exc, MAX_ERROR_TEXT)


@dataclass(frozen=True)
class Dial:
    """Where requests to an endpoint may connect: only `addresses` (resolved and judged in this pass;
    the name is never resolved again), or, with `by_name`, the host as written (the platform's own
    endpoint, an exact entry of its allow-list, an IP literal: all judged as written). Neither
    (NOWHERE, the default everywhere): no request is sent at all."""

    addresses: tuple[Any, ...] = ()
    by_name: bool = False

    def __bool__(self) -> bool:
        return self.by_name or bool(self.addresses)


NOWHERE = Dial()
BY_NAME = Dial(by_name=True)


class ResponseTooLarge(HTTPClientError):
    fmt = "the response body from {endpoint_url} is larger than {limit} bytes"


class NotDialled(HTTPClientError):
    fmt = "nothing sent to {host}: no address of it was resolved and judged in this pass"


class _Body(io.BytesIO):
    """A fully read (bounded) body that botocore can stream or read."""

    def stream(self, amt: int = _CHUNK, decode_content: bool = True):
        while chunk := self.read(amt):
            yield chunk


def _pinned(addresses: tuple[Any, ...], deadline: float):
    """A connect function for http.client that dials only `addresses` (the ones the reconcile resolved
    and judged), never the name again: a DNS answer that changes after the check (rebinding) cannot
    send the operator elsewhere. TLS still verifies the certificate against the name."""
    def create_connection(address: tuple[str, int], timeout: Any = None, source_address: Any = None, *_: Any) -> socket.socket:
        end, error = time.monotonic() + deadline, OSError(f"no address to connect to for {address[0]}")
        for ip in addresses:
            left = end - time.monotonic()
            if left <= 0:
                break
            try:
                return socket.create_connection((str(ip), address[1]), min(left, timeout or left), source_address)
            except OSError as exc:
                error = exc
        raise error
    return create_connection


def _abort(connection: http.client.HTTPConnection, fired: threading.Event) -> None:
    fired.set()
    sock = connection.sock
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class BoundedHTTP:
    """Sends botocore's prepared requests itself (the `before-send` hook): one deadline over the
    whole exchange, enforced by a watchdog that shuts the socket down (so a server that sends its
    headers or body one byte at a time, or nothing at all, cannot hold the call), and a cap on the
    body, read in chunks. One connection per request, no redirects, no retries. It connects where
    `dial` says: only to its addresses (see _pinned), by the name only where it says so, and nowhere
    by default (NotDialled, before any socket is opened)."""

    def __init__(self, deadline: float = REQUEST_DEADLINE_SECONDS, max_bytes: int = MAX_RESPONSE_BYTES,
                 dial: Dial = NOWHERE) -> None:
        self.deadline, self.max_bytes, self.dial = deadline, max_bytes, dial
        self.tls = ssl.create_default_context(cafile=os.environ.get("AWS_CA_BUNDLE") or get_cert_path(True))

    def __call__(self, request: Any, **_: Any) -> AWSResponse:
        url = urlsplit(request.url)
        if not self.dial:
            raise NotDialled(host=url.hostname)
        if url.scheme == "https":
            connection: http.client.HTTPConnection = http.client.HTTPSConnection(
                url.hostname, url.port, timeout=min(self.deadline, 5.0), context=self.tls)
        else:
            connection = http.client.HTTPConnection(url.hostname, url.port, timeout=min(self.deadline, 5.0))
        if self.dial.addresses:
            # http.client dials through this attribute (connect(); HTTPS wraps the socket afterwards).
            connection._create_connection = _pinned(self.dial.addresses, self.deadline)  # type: ignore[attr-defined]
        fired = threading.Event()
        watchdog = threading.Timer(self.deadline, _abort, (connection, fired))
        watchdog.daemon = True
        watchdog.start()
        body = io.BytesIO()
        error: Exception | None = None
        try:
            target = (url.path or "/") + (f"?{url.query}" if url.query else "")
            connection.request(request.method, target, body=request.body, headers=dict(request.headers.items()))
            response = connection.getresponse()
            while chunk := response.read1(_CHUNK):
                body.write(chunk)
                if body.tell() > self.max_bytes:
                    raise ResponseTooLarge(endpoint_url=request.url, limit=self.max_bytes)
            status, headers = response.status, dict(response.getheaders())
        except (OSError, http.client.HTTPException) as exc:
            error = exc
        finally:
            watchdog.cancel()
            connection.close()
        # A cut-off answer is no answer, whatever http.client made of what arrived before the cut.
        if fired.is_set():
            raise ReadTimeoutError(endpoint_url=request.url, error=f"no complete answer within {self.deadline:.0f}s")
        if error is not None:
            raise HTTPClientError(error=server_text(f"{type(error).__name__}: {error}", 200))
        return AWSResponse(request.url, status, headers, _Body(body.getvalue()))


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str
    session_token: str | None = None

    @classmethod
    def from_secret_data(cls, data: dict[str, str]) -> "Credentials":
        def dec(key: str) -> str | None:
            return base64.b64decode(data[key]).decode(errors="replace") if key in data else None

        return cls(dec("AWS_ACCESS_KEY_ID") or "", dec("AWS_SECRET_ACCESS_KEY") or "", dec("AWS_SESSION_TOKEN"))

    def values(self) -> tuple[str | None, ...]:
        return self.access_key, self.secret_key, self.session_token


def split_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri}")
    bucket, _, key = uri[5:].partition("/")
    return bucket, key


def client(endpoint: str, region: str, creds: Credentials, http: BoundedHTTP | None = None,
           dial: Dial = NOWHERE) -> Any:
    """A client whose every request goes through `http` (or a BoundedHTTP connecting where `dial` says)."""
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint or None,
        region_name=region,
        aws_access_key_id=creds.access_key,
        aws_secret_access_key=creds.secret_key,
        aws_session_token=creds.session_token,
        config=BotoConfig(connect_timeout=3, read_timeout=5, retries={"total_max_attempts": 1},
                          s3={"addressing_style": "path"}),
    )
    s3.meta.events.register("before-send.s3", http or BoundedHTTP(dial=dial))
    return s3


def _error_code(exc: ClientError) -> str:
    return server_text((exc.response.get("Error") or {}).get("Code", ""))


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
            log.warning("cannot read %s: %s", uri, describe(exc))
        return None
    except BotoCoreError as exc:
        log.warning("cannot read %s: %s", uri, describe(exc))
        return None
    try:
        return model.model_validate(json.loads(body, parse_constant=_no_constants))
    except (ValueError, ValidationError, RecursionError) as exc:
        log.warning("ignoring malformed %s: %s", uri, describe(exc))
        return None


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not a number")


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
        return S3Check(None, code or describe(exc))
    except BotoCoreError as exc:
        return S3Check(None, describe(exc))


def blank(encoded: str) -> bool:
    """Whether a Secret's base64 value is empty or only whitespace once decoded."""
    try:
        return not base64.b64decode(encoded).decode(errors="replace").strip()
    except ValueError:
        return True


def _tenant_client(endpoint: str, region: str, creds: Credentials, dial: Dial) -> tuple[Any, str]:
    """(client, "") or (None, why not): botocore refuses some regions and endpoints when the client is
    made; the schema refuses them too, but a storage function never raises."""
    try:
        return client(endpoint, region, creds, dial=dial), ""
    except (BotoCoreError, ValueError) as exc:
        return None, f"cannot configure an S3 client: {server_text(exc, MAX_ERROR_TEXT)}"


def check_inputs(endpoint: str, region: str, creds: Credentials, uris: dict[str, str],
                 dial: Dial = NOWHERE) -> dict[str, S3Check]:
    """check_uris with a client of its own (for the I/O executor: nothing of it runs on the event loop),
    connecting where `dial` says."""
    s3, error = _tenant_client(endpoint, region, creds, dial)
    return check_uris(s3, uris) if s3 is not None else {path: S3Check(None, error) for path in uris}


def read_documents(endpoint: str, region: str, creds: Credentials, output_uri: str, run_id: str,
                   dial: Dial = NOWHERE) -> RunDocuments:
    s3, error = _tenant_client(endpoint, region, creds, dial)
    if s3 is None:
        log.warning("%s: %s", output_uri, error)
        return RunDocuments()
    return read_run_documents(s3, output_uri, run_id)


def check_uris(s3: Any, uris: dict[str, str], budget: float = CHECK_BUDGET_SECONDS) -> dict[str, S3Check]:
    """Check each URI until the time budget is spent; the ones left are reported as not checked (a
    transient problem: the next pass goes on)."""
    end = time.monotonic() + budget
    out = {}
    for path, uri in uris.items():
        if time.monotonic() >= end:
            out[path] = S3Check(None, f"not checked: the storage used up the {budget:.0f}s budget of this check")
            continue
        out[path] = check_uri(s3, uri)
    return out
