"""Every example applies as it is on the local cluster: each S3 location a FineTuneJob in examples/ reads (the
inputs the operator checks before a run: model, data, adapters, candidates, evaluation sets, filter files) is in
the local S3 that `make cluster-up` seeds."""

from __future__ import annotations

import sys

import pytest

from e2e.localcluster import s3 as local_s3
from e2e.localcluster.paths import REPO_ROOT
from finetune_operator.api.types import parse_spec
from finetune_operator.validation import s3_uris_to_check

sys.path.insert(0, str(REPO_ROOT / "tests" / "operator"))
from op_testdata import example_documents  # noqa: E402

pytestmark = pytest.mark.cluster

JOBS = [(f"{source}:{doc['metadata']['name']}", doc) for source, doc in example_documents()
        if doc["kind"] == "FineTuneJob"]


def _exists(client, uri: str) -> bool:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    listed = client.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
    return listed.get("KeyCount", 0) > 0


@pytest.mark.parametrize("name,job", JOBS, ids=[j[0] for j in JOBS])
def test_the_local_s3_holds_every_input_an_example_names(local_cluster, name, job):
    client = local_s3.client(local_cluster.s3_endpoint)
    missing = {field: uri for field, uri in s3_uris_to_check(parse_spec(job["spec"])).items()
               if not _exists(client, uri)}
    assert not missing, f"{name}: not in the local S3 (e2e/localcluster/seed.py seeds what examples name): {missing}"
