"""The trainer's S3 client holds the tenant's credentials or is never made: whatever else the AWS SDK
could find (here: a default session standing for the node's identity) is never used."""

from __future__ import annotations

import boto3
import pytest

from finetune_trainer.errors import ConfigError
from finetune_trainer.storage import Storage

CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


@pytest.fixture(autouse=True)
def ambient_identity(monkeypatch, tmp_path):
    """Credentials the SDK would fall back to: the default session's, as an instance role would be."""
    for var in CREDENTIAL_VARS + ("AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", boto3.Session(
        aws_access_key_id="AKIANODEIDENTITY", aws_secret_access_key="node-secret", aws_session_token="node-token",
        region_name="us-east-1"))


def signing_credentials(storage: Storage) -> tuple[str, str, str | None]:
    frozen = storage.client._request_signer._credentials.get_frozen_credentials()
    return frozen.access_key, frozen.secret_key, frozen.token


@pytest.mark.parametrize("env", [
    {},
    {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""},
    {"AWS_ACCESS_KEY_ID": "   ", "AWS_SECRET_ACCESS_KEY": "\t\n"},
    {"AWS_ACCESS_KEY_ID": "AKIATENANT", "AWS_SECRET_ACCESS_KEY": " "},
    {"AWS_SECRET_ACCESS_KEY": "tenant-secret"},
    {"AWS_ACCESS_KEY_ID": "AKIATENANT"},
    {"AWS_SESSION_TOKEN": "tenant-token"},
], ids=["none", "empty", "whitespace", "blank-secret", "no-key", "no-secret", "token-only"])
def test_no_client_without_the_tenants_credentials(monkeypatch, env):
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError, match="never falls back"):
        Storage(endpoint="http://127.0.0.1:9")


@pytest.mark.parametrize("env, expected", [
    ({"AWS_ACCESS_KEY_ID": "AKIATENANT", "AWS_SECRET_ACCESS_KEY": "tenant-secret"},
     ("AKIATENANT", "tenant-secret", None)),  # no token of the node's rides along
    ({"AWS_ACCESS_KEY_ID": "AKIATENANT", "AWS_SECRET_ACCESS_KEY": "tenant-secret", "AWS_SESSION_TOKEN": "  "},
     ("AKIATENANT", "tenant-secret", None)),
    ({"AWS_ACCESS_KEY_ID": " AKIATENANT\n", "AWS_SECRET_ACCESS_KEY": "tenant-secret ",
      "AWS_SESSION_TOKEN": "tenant-token"}, ("AKIATENANT", "tenant-secret", "tenant-token")),
], ids=["key-and-secret", "blank-token", "with-token"])
def test_the_client_signs_with_exactly_the_tenants_credentials(monkeypatch, env, expected):
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert signing_credentials(Storage(endpoint="http://127.0.0.1:9")) == expected
