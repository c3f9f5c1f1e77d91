"""Promoting the best trial's output and writing the search report, against a real S3 server (moto)."""

from __future__ import annotations

import base64
import json
import time

import pytest

from e2e.localcluster import s3 as local_s3
from finetune_operator import s3
from finetune_operator.api.search import Search
from finetune_operator.search import promote, report


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


CREDS = s3.Credentials.from_secret_data({"AWS_ACCESS_KEY_ID": b64(local_s3.ACCESS_KEY),
                                         "AWS_SECRET_ACCESS_KEY": b64(local_s3.SECRET_KEY)})

TRIAL_OUTPUT = {
    "adapter/adapter_model.safetensors": b"weights",
    "adapter/adapter_config.json": b'{"r": 16}',
    "merged/model.safetensors": b"merged weights",
    "checkpoints/r1/step-00000002/adapter_model.safetensors": b"checkpoint",
    "runs/r1/progress.json": b'{"step": 6}',
    "runs/r1/evaluation.json": b'{"perplexity": 4.2}',
    "runs/r1/result.json": b'{"succeeded": true}',
    "runs/r0/result.json": b'{"succeeded": false}',   # another run's documents stay where they are
}


@pytest.fixture
def storage(s3_bucket, s3_endpoint):
    raw, name = s3_bucket

    def put(objects: dict[str, bytes], prefix: str) -> None:
        for key, body in objects.items():
            raw.put_object(Bucket=name, Key=prefix + key, Body=body)

    def read(prefix: str) -> dict[str, bytes]:
        keys = [o["Key"] for page in raw.get_paginator("list_objects_v2").paginate(Bucket=name, Prefix=prefix)
                for o in page.get("Contents", [])]
        return {k[len(prefix):]: raw.get_object(Bucket=name, Key=k)["Body"].read() for k in keys}

    return s3_endpoint, name, put, read


def run(endpoint, source, dest, run_id="r1", **kwargs):
    return promote.promote(endpoint, local_s3.REGION, CREDS, source, dest, run_id, dial=s3.BY_NAME, **kwargs)


def test_promotion_copies_the_outputs_and_the_run_documents_but_no_checkpoint(storage):
    endpoint, name, put, read = storage
    put(TRIAL_OUTPUT, "out/trials/t1/")
    put({"adapter/adapter_model.safetensors": b"trial 10"}, "out/trials/t10/")  # t1 is not a prefix of t10
    result = run(endpoint, f"s3://{name}/out/trials/t1/", f"s3://{name}/out/")
    assert result.error == ""
    promoted = {k: v for k, v in read("out/").items() if not k.startswith("trials/")}
    assert promoted == {
        "adapter/adapter_model.safetensors": b"weights",
        "adapter/adapter_config.json": b'{"r": 16}',
        "merged/model.safetensors": b"merged weights",
        "runs/r1/progress.json": b'{"step": 6}',
        "runs/r1/evaluation.json": b'{"perplexity": 4.2}',
        "runs/r1/result.json": b'{"succeeded": true}',
    }
    assert sorted(result.copied) == sorted(f"s3://{name}/out/{k}" for k in promoted)
    assert result.copied[-1] == f"s3://{name}/out/runs/r1/result.json"  # the result last
    assert read("out/trials/t1/") == TRIAL_OUTPUT  # the trial keeps its output


@pytest.mark.parametrize("result, promoted", [
    ({"succeeded": True, "adapterUri": "s3://{b}/out/trials/t1/adapter/", "mergedUri": "s3://{b}/out/trials/t1/merged/",
      "futureField": [1]},
     {"succeeded": True, "adapterUri": "s3://{b}/out/adapter/", "mergedUri": "s3://{b}/out/merged/",
      "futureField": [1]}),
    ({"succeeded": True, "adapterUri": "s3://elsewhere/adapter/"},   # not the trial's: left as it is
     {"succeeded": True, "adapterUri": "s3://elsewhere/adapter/"}),
    ({"succeeded": True, "adapterUri": "s3://{b}/out/trials/t10/adapter/"},
     {"succeeded": True, "adapterUri": "s3://{b}/out/trials/t10/adapter/"}),
    ("[" * 100_000 + "]" * 100_000, "[" * 100_000 + "]" * 100_000),  # not a document: copied as it is
])
def test_the_promoted_result_names_the_promoted_outputs(storage, result, promoted):
    endpoint, name, put, read = storage

    def text(value):  # a document, with the test's bucket in its URIs
        return value if isinstance(value, str) else json.dumps(value).replace("{b}", name)

    put({"adapter/a.bin": b"a", "runs/r1/result.json": text(result).encode()}, "out/trials/t1/")
    outcome = run(endpoint, f"s3://{name}/out/trials/t1/", f"s3://{name}/out/")
    assert outcome.error == "" and outcome.copied[-1] == f"s3://{name}/out/runs/r1/result.json"
    body = read("out/runs/r1/")["result.json"]
    assert (body.decode() if isinstance(promoted, str) else json.loads(body)) == \
        (promoted if isinstance(promoted, str) else json.loads(text(promoted)))


def test_promoting_again_is_harmless(storage):
    endpoint, name, put, read = storage
    put(TRIAL_OUTPUT, "out/trials/t1/")
    first = run(endpoint, f"s3://{name}/out/trials/t1", f"s3://{name}/out")  # prefixes without a slash too
    second = run(endpoint, f"s3://{name}/out/trials/t1/", f"s3://{name}/out/")
    assert first.error == second.error == "" and first.copied == second.copied
    assert read("out/adapter/") == {"adapter_model.safetensors": b"weights", "adapter_config.json": b'{"r": 16}'}


def test_a_large_object_is_copied_in_parts_on_the_server(storage, monkeypatch):
    endpoint, name, put, read = storage
    monkeypatch.setattr(promote, "TRANSFER_CONFIG", promote.TransferConfig(
        multipart_threshold=5 << 20, multipart_chunksize=5 << 20, max_request_concurrency=2))
    body = bytes(range(256)) * (11 << 12)  # 11 MiB: three parts of at most 5 MiB
    put({"merged/model.safetensors": body}, "out/trials/t0/")
    result = run(endpoint, f"s3://{name}/out/trials/t0/", f"s3://{name}/out/")
    assert result.error == "" and read("out/merged/") == {"model.safetensors": body}
    raw = local_s3.client(endpoint)
    assert raw.head_object(Bucket=name, Key="out/merged/model.safetensors")["ETag"].endswith('-3"')


def test_more_objects_than_the_limit_copies_the_limit_and_says_so(storage, monkeypatch):
    endpoint, name, put, read = storage
    monkeypatch.setattr(promote, "MAX_PROMOTED_OBJECTS", 3)
    put({f"adapter/shard-{i}": b"x" for i in range(5)}, "out/trials/t0/")
    result = run(endpoint, f"s3://{name}/out/trials/t0/", f"s3://{name}/out/")
    assert "more than 3 objects" in result.error
    assert len(result.copied) == 3 and len(read("out/adapter/")) == 3


def test_the_listing_is_paged_and_bounded(storage, monkeypatch):
    endpoint, name, put, read = storage
    monkeypatch.setattr(promote, "LIST_PAGE_KEYS", 2)
    put({f"adapter/shard-{i}": b"x" for i in range(5)}, "out/trials/t0/")
    assert run(endpoint, f"s3://{name}/out/trials/t0/", f"s3://{name}/out/").error == ""
    assert len(read("out/adapter/")) == 5
    monkeypatch.setattr(promote, "MAX_LISTED_OBJECTS", 4)
    assert "more than 4 objects" in run(endpoint, f"s3://{name}/out/trials/t0/", f"s3://{name}/out/").error


def test_keys_that_would_be_read_elsewhere_are_not_copied(storage):
    endpoint, name, put, read = storage
    put({"adapter/config.json": b"{}", "adapter/../../../../etc/passwd": b"evil"}, "out/trials/t0/")
    result = run(endpoint, f"s3://{name}/out/trials/t0/", f"s3://{name}/out/")
    assert "1 object(s) not copied" in result.error and "passwd" in result.error
    assert f"s3://{name}/out/adapter/config.json" in result.copied
    assert not any(".." in uri for uri in result.copied)
    assert set(read("out/adapter/")) == {"config.json"}


@pytest.mark.parametrize("key, expected", [
    ("src/adapter/a.bin", "dst/adapter/a.bin"),
    ("src/a", "dst/a"),
    ("src/", None),                    # the prefix itself (a folder marker)
    ("other/a", None),                 # outside the source: the endpoint's listing lied
    ("srcx/a", None),
    ("src/../a", None),
    ("src/a/./b", None),
    ("src/a/..", None),
    ("src//a", None),                  # "/a" would be absolute to a path-joining reader
    ("src/a\x00b", None),
    ("src/a\nb", None),
    ("src/a..b/c", "dst/a..b/c"),      # dots inside a name are fine
])
def test_destination_key(key, expected):
    assert promote.destination_key("src/", "dst/", key) == expected


@pytest.mark.parametrize("source, dest, run_id, error", [
    ("s3://b/out/", "s3://b/out/trials/t0/", "r1", "inside the source"),
    ("s3://b/out/trials/t0/", "s3://b/out/trials/t0", "r1", "inside the source"),
    ("file:///etc/", "s3://b/out/", "r1", "not an s3:// URI"),
    ("s3://b/out/trials/t0/", "s3:///out/", "r1", "no bucket"),
    ("s3://b/out/trials/t0/", "s3://b/out/", "../r1", "not a run id"),
    ("s3://b/out/trials/t0/", "s3://b/out/", "", "not a run id"),
])
def test_refused_before_any_request(source, dest, run_id, error):
    result = promote.promote("http://127.0.0.1:9", "us-east-1", CREDS, source, dest, run_id, dial=s3.BY_NAME)
    assert result == promote.PromoteResult([], result.error) and error in result.error


def test_an_empty_trial_output_is_not_a_promotion(storage):
    endpoint, name, _, read = storage
    result = run(endpoint, f"s3://{name}/out/trials/t0/", f"s3://{name}/out/")
    assert result.copied == [] and "nothing to promote" in result.error


def test_a_missing_bucket_is_an_error_not_an_exception(storage):
    endpoint, *_ = storage
    result = run(endpoint, "s3://no-such-bucket-here/out/trials/t0/", "s3://no-such-bucket-here/out/")
    assert result.copied == [] and "NoSuchBucket" in result.error


def test_a_client_that_cannot_be_configured_is_an_error():
    result = promote.promote("http://127.0.0.1:9", " ", CREDS, "s3://b/o/trials/t0/", "s3://b/o/", "r1",
                             dial=s3.BY_NAME)
    assert "cannot configure an S3 client" in result.error
    written = promote.write_report("http://127.0.0.1:9", " ", CREDS, "s3://b/o/runs/r1/", DOCUMENT, dial=s3.BY_NAME)
    assert written.uri == "" and "cannot configure an S3 client" in written.error


@pytest.fixture(scope="module")
def hostile():
    from e2e.localcluster.hostile_s3 import HostileS3

    with HostileS3(drip_interval=0.2) as server:
        yield server


@pytest.mark.parametrize("bucket", ["silent", "drip", "huge", "garbage"])
def test_a_hostile_endpoint_costs_one_deadline(hostile, bucket):
    http = s3.BoundedHTTP(deadline=1.0, dial=s3.BY_NAME)
    t0 = time.monotonic()
    result = promote.promote(hostile.endpoint, "us-east-1", s3.Credentials("a", "b"), f"s3://{bucket}/o/trials/t0/",
                             f"s3://{bucket}/o/", "r1", http=http)
    written = promote.write_report(hostile.endpoint, "us-east-1", s3.Credentials("a", "b"), f"s3://{bucket}/o/r/",
                                   DOCUMENT, http=http)
    assert time.monotonic() - t0 < 2 * 1.0 + 1.5
    assert result.copied == [] and result.error and written.uri == "" and written.error


def test_the_time_budget_stops_a_promotion(storage):
    endpoint, name, put, _ = storage
    put(TRIAL_OUTPUT, "out/trials/t1/")
    result = run(endpoint, f"s3://{name}/out/trials/t1/", f"s3://{name}/out/", budget=0.0)
    assert result.copied == [] and "time budget" in result.error


SEARCH = Search.model_validate({"parameters": {"learningRate": {"values": [1e-4, 3e-4]}}, "strategy": "grid"})
DOCUMENT = report.report_document("tune", "r1", SEARCH, {
    "trials": [{"number": 0, "phase": "Succeeded", "value": 1.4, "parameters": {"learningRate": 1e-4},
                "history": [{"step": 2, "value": 1.8}, {"step": 4, "value": 1.4}], "step": 4}],
    "best": {"number": 0, "value": 1.4, "parameters": {"learningRate": 1e-4}}}, "s3://b/out/")


def test_write_report_puts_the_json_the_markdown_and_the_plot(storage):
    endpoint, name, _, read = storage
    result = promote.write_report(endpoint, local_s3.REGION, CREDS, f"s3://{name}/out/runs/r1", DOCUMENT,
                                  dial=s3.BY_NAME)
    assert result == promote.ReportResult(uri=f"s3://{name}/out/runs/r1/search-report.md")
    files = read("out/runs/r1/")
    assert set(files) == {"search-report.json", "search-report.md", "search-validation.png"}
    assert json.loads(files["search-report.json"]) == DOCUMENT
    assert files["search-report.md"].decode() == report.markdown(DOCUMENT)
    assert files["search-validation.png"].startswith(b"\x89PNG\r\n\x1a\n")
    raw = local_s3.client(endpoint)
    types = {f: raw.head_object(Bucket=name, Key=f"out/runs/r1/{f}")["ContentType"] for f in files}
    assert types == promote.REPORT_FILES


@pytest.mark.parametrize("document, error", [
    ({**DOCUMENT, "seed": float("nan")}, "cannot render"),   # not JSON
    ({"job": "tune"}, "cannot render"),                      # not a report document
])
def test_a_report_that_cannot_be_rendered_is_an_error(storage, document, error):
    endpoint, name, _, read = storage
    result = promote.write_report(endpoint, local_s3.REGION, CREDS, f"s3://{name}/out/runs/r1/", document,
                                  dial=s3.BY_NAME)
    assert result.uri == "" and error in result.error and read("out/") == {}


def test_write_report_to_a_missing_bucket_is_an_error(storage):
    endpoint, *_ = storage
    result = promote.write_report(endpoint, local_s3.REGION, CREDS, "s3://no-such-bucket-here/o/runs/r1/", DOCUMENT,
                                  dial=s3.BY_NAME)
    assert result.uri == "" and "NoSuchBucket" in result.error
