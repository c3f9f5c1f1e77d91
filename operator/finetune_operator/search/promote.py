"""Promoting the best trial's output to output.uri, and writing the search report, in the tenant's S3.

Blocking, with the tenant's credentials: run these in the tenant I/O executor (tenant_io.py). They
never raise for storage problems; they return what was done and an error ("" when all went well).
Copies are server-side (CopyObject, or UploadPartCopy for large objects, through s3transfer): no
object's bytes pass through the operator. Every request has the deadlines of s3.client
(s3.BoundedHTTP); the number of objects listed and copied and the time spent are bounded too, since
the listing comes from the tenant's endpoint and may say anything.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from botocore.exceptions import BotoCoreError, ClientError
from s3transfer.manager import TransferConfig, TransferManager

from finetune_operator import redact, s3
from finetune_operator.search import report

MAX_PROMOTED_OBJECTS = 10_000
MAX_LISTED_OBJECTS = 4 * MAX_PROMOTED_OBJECTS  # skipped ones (checkpoints) included
# A listing answer must fit in s3.MAX_RESPONSE_BYTES: 250 keys of 1024 bytes, URL-encoded, do.
LIST_PAGE_KEYS = 250
PROMOTE_BUDGET_SECONDS = 540.0  # under the reconcile's wait (reconcile.PROMOTE_TIMEOUT)
SKIPPED = ("checkpoints/", "runs/")
# Copied last, result.json the very last: whoever sees the result sees the outputs in place.
RUN_DOCUMENTS = ("data-report.json", "progress.json", "evaluation.json", "result.json")
# Parts of 64 MiB: a 5 GiB part would not be copied within one request deadline.
TRANSFER_CONFIG = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20,
                                 max_request_concurrency=4)
REPORT_FILES = {  # file name -> content type; the Markdown last, as it links the others
    report.PLOT_FILE: "image/png",
    "search-report.json": "application/json",
    "search-report.md": "text/markdown; charset=utf-8",
}
_RUN_ID = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}


@dataclass
class PromoteResult:
    copied: list[str] = field(default_factory=list)  # destination URIs, in the order copied
    error: str = ""


@dataclass
class ReportResult:
    uri: str = ""  # the Markdown report ("" when it was not written)
    error: str = ""


class _Stop(Exception):
    """Ends a promotion early with a message for the status."""


def _message(exc: BaseException) -> str:
    # Cut before redacting (the text may be a server's megabyte), far enough out that no credential
    # in what is kept is cut in two.
    return s3.server_text(redact.REDACTOR.redact(f"{type(exc).__name__}: {exc}"[:4096]), s3.MAX_ERROR_TEXT)


def _prefix(uri: str) -> tuple[str, str]:
    bucket, key = s3.split_uri(uri)
    if not bucket:
        raise ValueError(f"no bucket in {uri}")
    return bucket, key if not key or key.endswith("/") else key + "/"


def _client(endpoint: str, region: str, creds: s3.Credentials, http: s3.BoundedHTTP | None,
            dial: s3.Dial) -> Any:
    try:
        return s3.client(endpoint, region, creds, http, dial)
    except (BotoCoreError, ValueError) as exc:
        raise _Stop(f"cannot configure an S3 client: {_message(exc)}") from None


def destination_key(source_key_prefix: str, dest_key_prefix: str, key: str) -> str | None:
    """Where a listed `key` goes under the destination, or None when it must not be copied: a key
    outside the source prefix (the listing is the tenant endpoint's word), or one whose relative
    path a path-normalising reader (a sync to disk, a model loader) would resolve elsewhere."""
    if not key.startswith(source_key_prefix) or key == source_key_prefix:
        return None
    relative = key[len(source_key_prefix):]
    segments = relative.split("/")
    if _CONTROL.search(relative) or relative.startswith("/") or any(s in (".", "..") for s in segments):
        return None
    return dest_key_prefix + relative


def _listing(client: Any, bucket: str, prefix: str, end: float) -> Iterator[str]:
    """Keys under `prefix`, at most MAX_LISTED_OBJECTS of them, each once, in as many full pages."""
    seen: set[str] = set()
    token: str | None = None
    for _ in range(MAX_LISTED_OBJECTS // LIST_PAGE_KEYS + 1):
        if time.monotonic() >= end:
            raise _Stop("listing the trial's output did not finish within the time budget")
        args = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": LIST_PAGE_KEYS}
        page = client.list_objects_v2(**args, **({"ContinuationToken": token} if token else {}))
        for entry in page.get("Contents") or []:
            key = entry.get("Key")
            if isinstance(key, str) and key not in seen:
                if len(seen) >= MAX_LISTED_OBJECTS:
                    raise _Stop(f"the trial's output lists more than {MAX_LISTED_OBJECTS} objects")
                seen.add(key)
                yield key
        next_token = page.get("NextContinuationToken")
        if not page.get("IsTruncated") or not next_token or next_token == token:
            return
        token = next_token
    raise _Stop(f"listing the trial's output took more than {MAX_LISTED_OBJECTS // LIST_PAGE_KEYS + 1} pages")


def _plan(client: Any, source: tuple[str, str], dest_key_prefix: str, skip: tuple[str, ...],
          end: float) -> tuple[list[tuple[str, str]], str]:
    """(source key, destination key) pairs to copy, and an error about what will not be copied."""
    pairs: list[tuple[str, str]] = []
    refused: list[str] = []
    for key in _listing(client, source[0], source[1], end):
        if key.startswith(source[1]) and key[len(source[1]):].startswith(skip):
            continue
        target = destination_key(source[1], dest_key_prefix, key)
        if target is None:
            refused.append(key)
        elif len(pairs) < MAX_PROMOTED_OBJECTS:
            pairs.append((key, target))
        else:
            return pairs, (f"the trial's output has more than {MAX_PROMOTED_OBJECTS} objects: "
                           f"only the first {MAX_PROMOTED_OBJECTS} were copied")
    if refused:
        return pairs, (f"{len(refused)} object(s) not copied: their keys would leave the destination prefix "
                       f"or be read elsewhere (e.g. {redact.REDACTOR.redact(repr(refused[0][:200]))})")
    return pairs, ""


def _copy_objects(client: Any, source_bucket: str, dest_bucket: str, pairs: list[tuple[str, str]], end: float,
                  copied: list[str]) -> None:
    with TransferManager(client, TRANSFER_CONFIG) as manager:
        for key, target in pairs:
            if time.monotonic() >= end:
                raise _Stop(f"copied {len(copied)} of {len(pairs)} objects within the time budget")
            future = manager.copy({"Bucket": source_bucket, "Key": key}, dest_bucket, target)
            try:
                future.result()
            # s3transfer re-raises whatever its worker threads met (ClientError, BotoCoreError, its own).
            except Exception as exc:  # noqa: BLE001
                raise _Stop(f"cannot copy s3://{source_bucket}/{key}: {_message(exc)}") from None
            copied.append(f"s3://{dest_bucket}/{target}")


def _promoted_result(client: Any, source: tuple[str, str], dest: tuple[str, str], key: str) -> bytes | None:
    """The trial's result.json with its adapterUri, mergedUri and combinedUri moved to the destination, or None
    when it names nothing under the source (then it is copied as it is). NoSuchKey raises."""
    body = client.get_object(Bucket=source[0], Key=key)["Body"].read(s3.MAX_DOCUMENT_BYTES + 1)
    try:
        document = json.loads(body) if len(body) <= s3.MAX_DOCUMENT_BYTES else None
    except (ValueError, RecursionError):
        return None
    if not isinstance(document, dict):
        return None
    source_uri, dest_uri = f"s3://{source[0]}/{source[1]}", f"s3://{dest[0]}/{dest[1]}"
    moved = {name: dest_uri + uri[len(source_uri):] for name in ("adapterUri", "mergedUri", "combinedUri")
             if isinstance(uri := document.get(name), str) and uri.startswith(source_uri)}
    return json.dumps({**document, **moved}).encode() if moved else None


def _copy_documents(client: Any, source: tuple[str, str], dest: tuple[str, str], run_id: str,
                    copied: list[str]) -> None:
    """The trial's run documents, those it wrote (small: one request each); the result names the
    promoted outputs, not the trial's."""
    for name in RUN_DOCUMENTS:
        key, target = f"{source[1]}runs/{run_id}/{name}", f"{dest[1]}runs/{run_id}/{name}"
        try:
            body = _promoted_result(client, source, dest, key) if name == "result.json" else None
            if body is None:
                client.copy_object(CopySource={"Bucket": source[0], "Key": key}, Bucket=dest[0], Key=target)
            else:
                client.put_object(Bucket=dest[0], Key=target, Body=body, ContentType="application/json")
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) in _NOT_FOUND:
                continue
            raise _Stop(f"cannot copy s3://{source[0]}/{key}: {_message(exc)}") from None
        except BotoCoreError as exc:
            raise _Stop(f"cannot copy s3://{source[0]}/{key}: {_message(exc)}") from None
        copied.append(f"s3://{dest[0]}/{target}")


def promote(endpoint: str, region: str, creds: s3.Credentials, source_prefix: str, dest_prefix: str, run_id: str,
            skip: tuple[str, ...] = SKIPPED, *, budget: float = PROMOTE_BUDGET_SECONDS,
            http: s3.BoundedHTTP | None = None, dial: s3.Dial = s3.NOWHERE) -> PromoteResult:
    """Copy every object under `source_prefix` (a trial's output), except the `skip` sub-prefixes, to
    the same relative key under `dest_prefix`, then the trial's documents of run `run_id` (its
    result.json naming the promoted adapter and merged model instead of the trial's). Copying
    again is harmless: a promotion cut short is finished by the next call. `error` non-empty means
    the destination is not a complete promotion, whatever `copied` holds."""
    result = PromoteResult()
    try:
        if not _RUN_ID.match(run_id):
            raise _Stop(f"not a run id: {run_id!r}"[:100])
        try:
            source, dest = _prefix(source_prefix), _prefix(dest_prefix)
        except ValueError as exc:
            raise _Stop(str(exc)[:300]) from None
        if source[0] == dest[0] and dest[1].startswith(source[1]):
            raise _Stop(f"the destination {dest_prefix} is inside the source {source_prefix}")
        client = _client(endpoint, region, creds, http, dial)
        end = time.monotonic() + budget
        pairs, problem = _plan(client, source, dest[1], tuple(skip), end)
        if not pairs and not problem:
            raise _Stop(f"nothing to promote: no objects under {source_prefix}")
        _copy_objects(client, source[0], dest[0], pairs, end, result.copied)
        _copy_documents(client, source, dest, run_id, result.copied)
        result.error = problem
    except _Stop as stop:
        result.error = str(stop)
    except (ClientError, BotoCoreError) as exc:  # a listing request that failed
        result.error = f"cannot list {source_prefix}: {_message(exc)}"
    return result


def _render(document: dict) -> dict[str, bytes]:
    return {
        report.PLOT_FILE: report.plot_png(document),
        "search-report.json": json.dumps(document, indent=2, allow_nan=False).encode(),
        "search-report.md": report.markdown(document).encode(),
    }


def write_report(endpoint: str, region: str, creds: s3.Credentials, run_prefix_uri: str, document: dict, *,
                 http: s3.BoundedHTTP | None = None, dial: s3.Dial = s3.NOWHERE) -> ReportResult:
    """Put search-report.json, search-report.md and search-validation.png under `run_prefix_uri`
    (<output>/runs/<runId>/); the result names the Markdown report."""
    try:
        bucket, key = _prefix(run_prefix_uri)
    except ValueError as exc:
        return ReportResult(error=str(exc)[:300])
    try:
        bodies = _render(document)
    # A malformed document or a plotting failure: a report is not worth a failed reconcile.
    except Exception as exc:  # noqa: BLE001
        return ReportResult(error=f"cannot render the search report: {_message(exc)}")
    try:
        client = _client(endpoint, region, creds, http, dial)
        for name, content_type in REPORT_FILES.items():
            try:
                client.put_object(Bucket=bucket, Key=key + name, Body=bodies[name], ContentType=content_type)
            except (ClientError, BotoCoreError) as exc:
                raise _Stop(f"cannot write s3://{bucket}/{key}{name}: {_message(exc)}") from None
    except _Stop as stop:
        return ReportResult(error=str(stop))
    return ReportResult(uri=f"s3://{bucket}/{key}search-report.md")
