"""Reading trainer documents and checking inputs against a real S3 server (moto, on loopback)."""

from __future__ import annotations

import base64
import json

import pytest

from e2e.localcluster import s3 as local_s3
from finetune_operator import s3
from finetune_operator.validation import S3Check
from finetune_trainer.config import Progress, progress_uri, result_uri


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture
def bucket(s3_bucket, s3_endpoint):
    raw, name = s3_bucket
    creds = s3.Credentials.from_secret_data({"AWS_ACCESS_KEY_ID": b64(local_s3.ACCESS_KEY),
                                             "AWS_SECRET_ACCESS_KEY": b64(local_s3.SECRET_KEY)})
    return raw, name, s3.client(s3_endpoint, local_s3.REGION, creds)


def test_credentials_from_secret_data():
    creds = s3.Credentials.from_secret_data({"AWS_ACCESS_KEY_ID": b64("a"), "AWS_SECRET_ACCESS_KEY": b64("b"),
                                             "AWS_SESSION_TOKEN": b64("c")})
    assert creds == s3.Credentials("a", "b", "c")


@pytest.mark.parametrize("content,expected_step", [
    (json.dumps({"step": 7, "totalSteps": 10, "futureField": 1}), 7),  # unknown fields are ignored
    ("{not json", None),
    (json.dumps({"step": "seven"}), None),
    (json.dumps([1, 2]), None),
])
def test_read_progress_document(bucket, content, expected_step):
    raw, name, client = bucket
    uri = progress_uri(f"s3://{name}/out/", "1")
    raw.put_object(Bucket=name, Key=uri.split("/", 3)[3], Body=content.encode())
    doc = s3.read_document(client, uri, Progress)
    assert (doc.step if doc else None) == expected_step


def test_missing_documents_are_none(bucket):
    _, name, client = bucket
    docs = s3.read_run_documents(client, f"s3://{name}/out/", "1")
    assert docs.progress is None and docs.evaluation is None and docs.result is None


def test_read_run_documents(bucket):
    raw, name, client = bucket
    out = f"s3://{name}/out/"
    raw.put_object(Bucket=name, Key=result_uri(out, "2").split("/", 3)[3],
                   Body=json.dumps({"succeeded": True, "adapterUri": f"{out}adapter/"}).encode())
    docs = s3.read_run_documents(client, out, "2")
    assert docs.result is not None and docs.result.succeeded and docs.result.adapterUri == f"{out}adapter/"


def test_check_uris(bucket):
    raw, name, client = bucket
    raw.put_object(Bucket=name, Key="models/tiny/config.json", Body=b"{}")
    raw.put_object(Bucket=name, Key="data/train.jsonl", Body=b"{}")
    checks = s3.check_uris(client, {
        "prefix with slash": f"s3://{name}/models/tiny/",
        "prefix without slash": f"s3://{name}/models/tiny",
        "object": f"s3://{name}/data/train.jsonl",
        "missing object": f"s3://{name}/data/other.jsonl",
        "missing bucket": "s3://no-such-bucket-here/x.jsonl",
    })
    assert {k: v.exists for k, v in checks.items()} == {
        "prefix with slash": True, "prefix without slash": True, "object": True,
        "missing object": False, "missing bucket": False,
    }


@pytest.mark.parametrize("region", [" ", "-1", "a" * 70])
def test_a_client_that_cannot_be_configured_is_a_message_not_an_exception(region):
    """Found by the fuzzing test on the cluster: botocore refuses such a region when the client is made."""
    checks = s3.check_inputs("http://127.0.0.1:9", region, s3.Credentials("a", "b"), {"spec.model.uri": "s3://b/m/"})
    assert checks["spec.model.uri"].exists is None and "region" in checks["spec.model.uri"].error
    assert s3.read_documents("http://127.0.0.1:9", region, s3.Credentials("a", "b"), "s3://b/o/", "1") == \
        s3.RunDocuments()


def test_unreachable_endpoint_is_not_a_verdict():
    client = s3.client("http://127.0.0.1:9", "us-east-1", s3.Credentials("a", "b"))
    check = s3.check_uri(client, "s3://bucket/x.jsonl")
    assert check.exists is None and check.error
    assert s3.read_document(client, "s3://bucket/progress.json", Progress) is None


def test_a_pinned_client_dials_only_the_judged_addresses(s3_endpoint, s3_bucket):
    """The reconcile judges what a wildcard endpoint's name resolved to; the requests then go to those
    addresses and the name is never resolved again (a DNS answer that changes after the check, i.e.
    rebinding, has nothing to change). `.invalid` never resolves, so only the pinned address can answer."""
    import ipaddress

    _, name = s3_bucket
    port = s3_endpoint.rsplit(":", 1)[1]
    creds = s3.Credentials(local_s3.ACCESS_KEY, local_s3.SECRET_KEY)
    uris = {"spec.dataset.uri": f"s3://{name}/nothing-here.jsonl"}
    pinned = s3.check_inputs(f"http://objects.pinned.invalid:{port}", local_s3.REGION, creds, uris,
                             addresses=(ipaddress.ip_address("::1"), ipaddress.ip_address("127.0.0.1")))
    assert pinned["spec.dataset.uri"] == S3Check(False)  # answered by the local S3, after the first address failed
    by_name = s3.check_inputs(f"http://objects.pinned.invalid:{port}", local_s3.REGION, creds, uris)
    assert by_name["spec.dataset.uri"].exists is None


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("content", [
    DEEP,                                                    # nesting deeper than the parser's recursion
    '{"step": ' + "9" * 5000 + "}",                          # an integer longer than Python parses
    '{"step": 1e400}',                                       # a float that is infinite
    '{"step": 5, "loss": NaN}',                              # not JSON numbers
    '{"step": 5, "loss": -Infinity}',
    json.dumps({"step": 1, "stage": "x" * 2_000_000}),      # over the document size limit
])
def test_hostile_documents_are_refused_without_an_exception(bucket, content):
    raw, name, client = bucket
    uri = progress_uri(f"s3://{name}/out/", "1")
    raw.put_object(Bucket=name, Key=uri.split("/", 3)[3], Body=content.encode())
    assert s3.read_document(client, uri, Progress) is None


@pytest.fixture(scope="module")
def hostile():
    from e2e.localcluster.hostile_s3 import HostileS3

    with HostileS3(drip_interval=0.2) as server:
        yield server


@pytest.mark.parametrize("bucket_name, error", [
    ("drip", "timeout"), ("drip-head", "timeout"), ("silent", "timeout"),
    ("huge", "larger than"), ("huge-5xx", "larger than"), ("garbage", ""),
])
def test_a_hostile_endpoint_costs_one_deadline_and_bounded_memory(hostile, bucket_name, error):
    import time

    client = s3.client(hostile.endpoint, "us-east-1", s3.Credentials("a", "b"), s3.BoundedHTTP(deadline=1.0))
    t0 = time.monotonic()
    check = s3.check_uri(client, f"s3://{bucket_name}/model/")
    document = s3.read_document(client, f"s3://{bucket_name}/out/progress.json", Progress)
    assert time.monotonic() - t0 < 2 * 1.0 + 1.0        # two calls, each within its deadline
    assert check.exists is None and error.lower() in check.error.lower()
    assert document is None


def test_the_input_check_stops_at_its_budget(hostile):
    import time

    client = s3.client(hostile.endpoint, "us-east-1", s3.Credentials("a", "b"), s3.BoundedHTTP(deadline=0.5))
    uris = {f"spec.datasets[{i}].uri": f"s3://silent/data-{i}/" for i in range(200)}
    t0 = time.monotonic()
    checks = s3.check_uris(client, uris, budget=2.0)
    assert time.monotonic() - t0 < 2.0 + 0.5 + 0.5
    assert all(c.exists is None for c in checks.values())
    assert sum("not checked" in c.error for c in checks.values()) >= 190


def test_blank_credential_values():
    assert s3.blank(b64("")) and s3.blank(b64("  \n")) and not s3.blank(b64("AKIA"))
