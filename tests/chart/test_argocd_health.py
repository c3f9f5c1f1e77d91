"""The Argo CD health check of FineTuneJob, run through a real Lua 5.1 interpreter (lupa) with the
test cases in Argo CD's own format (health_test.yaml + testdata/)."""

from __future__ import annotations

from pathlib import Path

import lupa.lua51 as lua51
import pytest
import yaml

from tests.chart.chartkit import ARGOCD

CHECK_DIR = ARGOCD / "resource_customizations" / "finetune.dev" / "FineTuneJob"
HEALTH_LUA = (CHECK_DIR / "health.lua").read_text()
CASES = yaml.safe_load((CHECK_DIR / "health_test.yaml").read_text())["tests"]


def run_health_check(obj: dict) -> dict:
    """What Argo CD does: a fresh Lua state, the object as the global `obj`, the script's result."""
    runtime = lua51.LuaRuntime(unpack_returned_tuples=True)
    assert runtime.eval("_VERSION") == "Lua 5.1"
    runtime.globals().obj = runtime.table_from(obj, recursive=True)
    result = runtime.execute(HEALTH_LUA)
    return {"status": result["status"], "message": result["message"]}


@pytest.mark.parametrize("case", CASES, ids=[Path(c["inputPath"]).stem for c in CASES])
def test_health_check_matches_argocd_test_case(case):
    obj = yaml.safe_load((CHECK_DIR / case["inputPath"]).read_text())
    assert run_health_check(obj) == case["healthStatus"]


def test_every_health_status_is_covered():
    assert {c["healthStatus"]["status"] for c in CASES} == {"Healthy", "Degraded", "Suspended", "Progressing"}


def test_every_testdata_object_has_a_test_case():
    referenced = {(CHECK_DIR / c["inputPath"]).resolve() for c in CASES}
    on_disk = {p.resolve() for p in (CHECK_DIR / "testdata").glob("*.yaml")}
    assert on_disk == referenced


def test_testdata_objects_are_finetunejobs():
    for case in CASES:
        obj = yaml.safe_load((CHECK_DIR / case["inputPath"]).read_text())
        assert (obj["apiVersion"], obj["kind"]) == ("finetune.dev/v1alpha1", "FineTuneJob"), case["inputPath"]


def test_argocd_cm_patch_embeds_the_health_check_verbatim():
    patch = yaml.safe_load((ARGOCD / "argocd-cm-patch.yaml").read_text())
    assert patch["metadata"] == {"name": "argocd-cm", "namespace": "argocd"}
    assert patch["data"] == {"resource.customizations.health.finetune.dev_FineTuneJob": HEALTH_LUA}


@pytest.mark.parametrize("newer_lua_only", ["goto ", "//", "<const>", "<close>", "table.unpack", "utf8."])
def test_health_check_keeps_to_lua_5_1(newer_lua_only):
    """gopher-lua implements Lua 5.1: no syntax or library of 5.2+ (lupa's 5.1 run proves the rest)."""
    assert newer_lua_only not in HEALTH_LUA
