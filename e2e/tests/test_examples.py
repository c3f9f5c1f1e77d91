"""Every example applies as it is on the local cluster: each S3 location a FineTuneJob in examples/ reads (the
inputs the operator checks before a run: model, data, adapters, candidates, evaluation sets, filter files) is in
the local S3 that `make cluster-up` seeds."""

from __future__ import annotations

import sys

import pytest

from e2e.localcluster import s3 as local_s3
from e2e.localcluster.paths import REPO_ROOT
from finetune_operator import s3
from finetune_operator.api.types import parse_spec
from finetune_operator.validation import s3_uris_to_check

sys.path.insert(0, str(REPO_ROOT / "tests" / "operator"))
from op_testdata import example_documents  # noqa: E402

pytestmark = pytest.mark.cluster

JOBS = [(f"{source}:{doc['metadata']['name']}", doc) for source, doc in example_documents()
        if doc["kind"] == "FineTuneJob"]


@pytest.mark.parametrize("name,job", JOBS, ids=[j[0] for j in JOBS])
def test_the_local_s3_holds_every_input_an_example_names(local_cluster, name, job):
    uris = s3_uris_to_check(parse_spec(job["spec"]))
    checks = s3.check_inputs(local_cluster.s3_endpoint, local_s3.REGION,
                             s3.Credentials(local_s3.ACCESS_KEY, local_s3.SECRET_KEY), uris, dial=s3.BY_NAME)
    missing = {field: uri for field, uri in uris.items() if not checks[field].exists}
    assert not missing, f"{name}: not in the local S3 (e2e/localcluster/seed.py seeds what examples name): {missing}"
