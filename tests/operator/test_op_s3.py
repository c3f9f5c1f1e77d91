"""Reading trainer documents and checking inputs against a real S3 server (moto, on loopback)."""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import socket

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
    return raw, name, s3.client(s3_endpoint, local_s3.REGION, creds, dial=s3.BY_NAME)


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
    checks = s3.check_inputs("http://127.0.0.1:9", region, s3.Credentials("a", "b"), {"spec.model.uri": "s3://b/m/"},
                             dial=s3.BY_NAME)
    assert checks["spec.model.uri"].exists is None and "region" in checks["spec.model.uri"].error
    assert s3.read_documents("http://127.0.0.1:9", region, s3.Credentials("a", "b"), "s3://b/o/", "1",
                             dial=s3.BY_NAME) == s3.RunDocuments()


def test_unreachable_endpoint_is_not_a_verdict():
    client = s3.client("http://127.0.0.1:9", "us-east-1", s3.Credentials("a", "b"), dial=s3.BY_NAME)
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
                             dial=s3.Dial(addresses=(ipaddress.ip_address("::1"), ipaddress.ip_address("127.0.0.1"))))
    assert pinned["spec.dataset.uri"] == S3Check(False)  # answered by the local S3, after the first address failed
    by_name = s3.check_inputs(f"http://objects.pinned.invalid:{port}", local_s3.REGION, creds, uris, dial=s3.BY_NAME)
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

    client = s3.client(hostile.endpoint, "us-east-1", s3.Credentials("a", "b"),
                       s3.BoundedHTTP(deadline=1.0, dial=s3.BY_NAME))
    t0 = time.monotonic()
    check = s3.check_uri(client, f"s3://{bucket_name}/model/")
    document = s3.read_document(client, f"s3://{bucket_name}/out/progress.json", Progress)
    assert time.monotonic() - t0 < 2 * 1.0 + 1.0        # two calls, each within its deadline
    assert check.exists is None and error.lower() in check.error.lower()
    assert document is None


def test_the_input_check_stops_at_its_budget(hostile):
    import time

    client = s3.client(hostile.endpoint, "us-east-1", s3.Credentials("a", "b"),
                       s3.BoundedHTTP(deadline=0.5, dial=s3.BY_NAME))
    uris = {f"spec.datasets[{i}].uri": f"s3://silent/data-{i}/" for i in range(200)}
    t0 = time.monotonic()
    checks = s3.check_uris(client, uris, budget=2.0)
    assert time.monotonic() - t0 < 2.0 + 0.5 + 0.5
    assert all(c.exists is None for c in checks.values())
    assert sum("not checked" in c.error for c in checks.values()) >= 190


def test_blank_credential_values():
    assert s3.blank(b64("")) and s3.blank(b64("  \n")) and not s3.blank(b64("AKIA"))


@pytest.mark.parametrize("text, kept", [
    ("NoSuchKey", "NoSuchKey"),
    ("Slow\nERROR forged line", "Slow\\nERROR forged line"),         # no forged log line
    ("\x1b[2J\x07", "\\x1b[2J\\x07"),                                # no terminal escape
    ("\u009b31m\u202eDEVRESER", "\\x9b31m\\u202eDEVRESER"),           # no C1 control, no bidi override
    ("E" * 1_000_000, "E" * (s3.MAX_SERVER_TEXT - 3) + "..."),          # a short prefix
    ("\x00" * 1000, "\\x00" * 31 + "\\..."),                           # escaping counts against the limit
    ("ünïcödé is fine", "ünïcödé is fine"),
])
def test_server_text_is_short_and_printable(text, kept):
    assert s3.server_text(text) == kept
    assert len(kept) <= s3.MAX_SERVER_TEXT and kept.isprintable()


HOSTILE_ANSWERS = [
    # bucket of e2e/localcluster/hostile_s3.py: what it answers
    ("code-huge", "500 with a 1 MB error code"),
    ("code-lines", "line breaks and a forged log line in the code and the message"),
    ("code-controls", "C1 controls and a bidi override in the code"),
    ("message-huge", "a 1 MB message of bidi overrides"),
    ("status-controls", "terminal escapes in a status line"),
    ("huge-5xx", "an endless error body"),
    ("garbage", "a body that is not XML"),
]


@pytest.mark.parametrize("bucket, answer", HOSTILE_ANSWERS, ids=[a[0] for a in HOSTILE_ANSWERS])
def test_what_a_server_says_is_kept_short_and_printable(hostile, bucket, answer, caplog):
    """What is kept of each answer (the checks, cached per job and shown in its status) and logged (on
    every document poll) is a short printable text, whatever the server sent: 20 URIs of a 1 MB error
    code once held 20 MB."""
    client = s3.client(hostile.endpoint, "us-east-1", s3.Credentials("a", "b"),
                       s3.BoundedHTTP(deadline=2.0, dial=s3.BY_NAME))
    uris = {f"spec.datasets[{i}].uri": f"s3://{bucket}/data-{i}/" for i in range(20)}
    with caplog.at_level(logging.WARNING, logger="finetune_operator.s3"):
        checks = s3.check_uris(client, uris)
        s3.read_document(client, f"s3://{bucket}/out/progress.json", Progress)
    logged = [r.getMessage() for r in caplog.records if r.name == "finetune_operator.s3"]
    assert logged and all(c.exists is None and c.error for c in checks.values())
    for text in [c.error for c in checks.values()] + logged:
        assert len(text) <= s3.MAX_ERROR_TEXT + 100 and text.isprintable(), text[:200]
    assert sum(len(c.error) for c in checks.values()) <= len(uris) * s3.MAX_ERROR_TEXT


@pytest.mark.parametrize("dial, dialled", [
    (s3.NOWHERE, []),                                                   # the default: no socket at all
    (s3.Dial(addresses=(ipaddress.ip_address("203.0.113.10"),)), [("203.0.113.10", 9000)]),
    (s3.BY_NAME, [("objects.example.com", 9000)]),                      # the platform's endpoint, as written
], ids=["nowhere", "pinned", "by-name"])
def test_a_request_connects_only_where_its_dial_says(dial, dialled, monkeypatch):
    attempts = []

    def refuse(address, *args, **kwargs):
        attempts.append(tuple(address))
        raise OSError("refused by the test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    client = s3.client("http://objects.example.com:9000", "us-east-1", s3.Credentials("a", "b"), dial=dial)
    check = s3.check_uri(client, "s3://bucket/model/")
    assert attempts == dialled and check.exists is None
    assert ("nothing sent to objects.example.com" in check.error) is (not dialled), check.error
    assert s3.read_documents("http://objects.example.com:9000", "us-east-1", s3.Credentials("a", "b"), "s3://b/o/", "1",
                             dial=dial) == s3.RunDocuments()
    assert attempts == dialled * 4
