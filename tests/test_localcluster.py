"""Pure pieces of the local node runtime (e2e/localcluster/noderuntime.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from e2e.localcluster.noderuntime import _rewrite_hosts, _rewrite_paths

# The pod folders lie under /tmp when the checkout does (CI clones anywhere): a rewritten path
# must not be rewritten again by the /tmp mount.
POD = "/tmp/checkout/.cluster/pods/ns/pod/volumes"
MOUNTS = {"/etc/finetune": Path(f"{POD}/trainer-config"), "/tmp": Path(f"{POD}/scratch"),
          "/dev/shm/": Path(f"{POD}/dshm")}


@pytest.mark.parametrize("value, expected", [
    ("/etc/finetune/trainer-config.json", f"{POD}/trainer-config/trainer-config.json"),
    ("--config=/etc/finetune/trainer-config.json", f"--config={POD}/trainer-config/trainer-config.json"),
    ("/tmp", f"{POD}/scratch"),
    ("/tmp/hf", f"{POD}/scratch/hf"),
    ("/dev/shm", f"{POD}/dshm"),
    ("/usr/bin:/tmp/bin", f"/usr/bin:{POD}/scratch/bin"),
    ("python -c /tmp/x", f"python -c {POD}/scratch/x"),
    ("/var/tmp/x", "/var/tmp/x"),            # a mount path inside another path
    ("/tmpfoo", "/tmpfoo"),                  # a longer name
    ("/etc/finetuned/x", "/etc/finetuned/x"),
    ("s3://bucket/tmp/x", "s3://bucket/tmp/x"),
    ("", ""),
])
def test_mount_paths_are_rewritten_once_and_only_as_whole_paths(value, expected):
    assert _rewrite_paths(value, MOUNTS) == expected


def test_no_mounts_leave_the_value_alone():
    assert _rewrite_paths("/tmp/x", {}) == "/tmp/x"


@pytest.mark.parametrize("value, expected", [
    ("train-1-master-0", "127.0.0.1"),
    ("train-1-master-0:23456", "127.0.0.1:23456"),
    ("train-1-master-0.example", "train-1-master-0.example"),
    ("/data/train-1-master-0/x", "/data/train-1-master-0/x"),
])
def test_pod_and_service_names_resolve_to_loopback(value, expected):
    assert _rewrite_hosts(value, {"train-1-master-0"}) == expected
