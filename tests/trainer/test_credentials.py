"""The trainer uses the tenant's credentials or none: never the node's identity."""

from __future__ import annotations

import pytest

from finetune_trainer.errors import ConfigError
from finetune_trainer.storage import tenant_credentials


@pytest.mark.parametrize("env", [
    {},
    {"AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": ""},
    {"AWS_ACCESS_KEY_ID": "  ", "AWS_SECRET_ACCESS_KEY": "secret"},
    {"AWS_SECRET_ACCESS_KEY": "secret"},
], ids=["none", "empty-secret", "blank-key", "no-key"])
def test_missing_or_blank_credentials_end_the_run_as_a_configuration_error(env):
    with pytest.raises(ConfigError, match="never falls back"):
        tenant_credentials(env)


def test_the_tenants_credentials_are_passed_explicitly():
    assert tenant_credentials({"AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": "s", "AWS_SESSION_TOKEN": ""}) == {
        "aws_access_key_id": "AKIA", "aws_secret_access_key": "s", "aws_session_token": None}
