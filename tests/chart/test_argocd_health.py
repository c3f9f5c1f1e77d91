"""The Argo CD health check of FineTuneJob, run as Argo CD runs it: in gopher-lua (the Lua VM inside
Argo CD) through e2e/runtimes/argocd-lua, with the libraries Argo CD opens for a script from argocd-cm
and with every library open (built-in checks, useOpenLibs), on test cases in Argo CD's own format
whose objects the operator's status code wrote (tests/chart/argocd_cases.py)."""

from __future__ import annotations

import functools
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from e2e.localcluster import build
from tests.chart import argocd_cases
from tests.chart.argocd_cases import ARGOCD, ARGOCD_CM_PATCH, CHECK_DIR, HEALTH_KEY, HEALTH_LUA, HEALTH_TEST, TESTDATA

CASES = yaml.safe_load(HEALTH_TEST.read_text())["tests"]
# Argo CD's library sets: argocd-cm scripts get package, base, table and os.time/os.date only.
LIBRARY_SETS = {"argocd-cm": False, "open-libs": True}
HEALTH_STATES = ("Healthy", "Progressing", "Degraded", "Suspended")
# Upstream's testdata naming: <health>_<case>.yaml.
TESTDATA_NAME = re.compile(r"^(healthy|progressing|degraded|suspended|missing|unknown)_[a-z0-9]+(_[a-z0-9]+)*\.yaml$")


def harness() -> Path:
    binary = build.ARGOCD_LUA.binary("argocd-lua")
    if not binary.exists():
        pytest.fail(f"the gopher-lua harness is not built ({binary}): run `make cluster-build` "
                    "(or `python -m e2e.localcluster.build argocd-lua`)")
    return binary


def run_scripts(script: Path, objects: list[dict], open_libs: bool) -> list[dict]:
    """One harness run: each object through the script in a fresh Lua state, results in order
    ({status, message}, or {error} when the script failed as Argo CD would report it)."""
    args = [str(harness()), *(["-open-libs"] if open_libs else []), "-script", str(script)]
    result = subprocess.run(args, input=json.dumps(objects), capture_output=True, text=True, timeout=60)
    assert result.returncode in (0, 1), f"argocd-lua failed ({result.returncode}): {result.stderr}"
    return json.loads(result.stdout)


def load(input_path: str) -> dict:
    return yaml.safe_load((CHECK_DIR / input_path).read_text())


@functools.cache
def health_of_every_case(open_libs: bool) -> dict[str, dict]:
    """The whole health_test.yaml in one run: inputPath -> what Argo CD would show."""
    results = run_scripts(HEALTH_LUA, [load(c["inputPath"]) for c in CASES], open_libs)
    return {c["inputPath"]: r for c, r in zip(CASES, results, strict=True)}


@pytest.mark.parametrize("case", CASES, ids=[Path(c["inputPath"]).stem for c in CASES])
@pytest.mark.parametrize("libraries", LIBRARY_SETS)
def test_health_check_matches_argocd_test_case(libraries, case):
    expected = {"status": case["healthStatus"]["status"], "message": case["healthStatus"].get("message", "")}
    assert health_of_every_case(LIBRARY_SETS[libraries])[case["inputPath"]] == expected


PROBES = [
    # script, result with argocd-cm's libraries (an error: its text), result with open libraries
    ('return {status = "Healthy", message = string.format("%d%%", 25)}',
     "<string>:1: attempt to index a non-table object(nil) with key 'format'", "25%"),
    ('return {status = "Healthy", message = tostring(math.floor(2.5))}',
     "<string>:1: attempt to index a non-table object(nil) with key 'floor'", "2"),
    ('return {status = "Healthy", message = ("abc"):upper()}',
     "<string>:1: attempt to index a non-table object(string) with key 'upper'", "ABC"),
    ('return {status = "Healthy", message = type(io) .. " " .. type(debug) .. " " .. type(coroutine)}',
     "nil nil nil", "table table table"),
    ('return {status = "Healthy", message = type(os.time()) .. " " .. type(os.exit) .. " " ..\n'
     '  type(require("os").date)}',
     "number nil function", "number function function"),
    ('return {status = "Healthy", message = tostring(25.0) .. " " .. (7 - 7.5 % 1) .. " " .. #obj.items}',
     "25 6.5 2", "25 6.5 2"),  # JSON nulls are dropped from arrays, as Argo CD's conversion does
]


@pytest.mark.parametrize("libraries", LIBRARY_SETS)
@pytest.mark.parametrize("script,restricted,open_", PROBES, ids=[f"probe{i}" for i in range(len(PROBES))])
def test_the_harness_opens_the_libraries_argocd_opens(tmp_path, libraries, script, restricted, open_):
    """Proof that the harness restricts like Argo CD: string.format fails for an argocd-cm script."""
    (tmp_path / "probe.lua").write_text(script)
    (result,) = run_scripts(tmp_path / "probe.lua", [{"items": [1, None, 3]}], LIBRARY_SETS[libraries])
    want = open_ if LIBRARY_SETS[libraries] else restricted
    if "attempt to index" in want:
        assert result == {"error": want}
    else:
        assert result == {"status": "Healthy", "message": want}


@pytest.mark.parametrize("script,expected", [
    ("return nil", {"status": "", "message": ""}),
    ("return {}", {"status": "", "message": ""}),
    ('return {status = "Fine"}', {"status": "Unknown", "message": "Lua returned an invalid health status"}),
    ("return 1", {"error": "expect table output from Lua script, not number"}),
    ("while true do end", {"error": "<string>:1: context deadline exceeded"}),
])
def test_the_harness_reads_results_as_argocd(tmp_path, script, expected):
    (tmp_path / "probe.lua").write_text(script)
    assert run_scripts(tmp_path / "probe.lua", [{}], open_libs=False) == [expected]


def test_the_health_check_calls_no_library_outside_argocd_cm():
    """Beyond the cases: no library table and no string method anywhere in the script."""
    code = re.sub(r"--[^\n]*", "", re.sub(r'"[^"\n]*"', '""', HEALTH_LUA.read_text()))
    assert not re.findall(r"\b(string|math|io|debug|coroutine|utf8|channel)\s*\.", code)
    assert not re.findall(r":\s*\w+\s*\(", code)


def test_every_health_status_is_covered():
    assert {c["healthStatus"]["status"] for c in CASES} == set(HEALTH_STATES)


@pytest.mark.parametrize("case", CASES, ids=[Path(c["inputPath"]).stem for c in CASES])
def test_testdata_is_named_as_upstream(case):
    name = Path(case["inputPath"]).name
    assert TESTDATA_NAME.match(name), name
    assert name.startswith(case["healthStatus"]["status"].lower() + "_")


def test_every_testdata_object_has_a_test_case():
    referenced = {(CHECK_DIR / c["inputPath"]).resolve() for c in CASES}
    assert {p.resolve() for p in TESTDATA.glob("*")} == referenced


def test_testdata_objects_are_finetunejobs():
    for case in CASES:
        obj = load(case["inputPath"])
        assert (obj["apiVersion"], obj["kind"]) == ("finetune.dev/v1alpha1", "FineTuneJob"), case["inputPath"]


def test_committed_files_are_what_the_status_code_generates_now():
    """The testdata comes from finetune_operator.status: a change there must be regenerated (and
    reviewed) rather than drift away from the Argo CD cases."""
    want, have = argocd_cases.render(), argocd_cases.generated_on_disk()
    stale = sorted(str(path.relative_to(ARGOCD)) for path in set(want) | set(have) if want.get(path) != have.get(path))
    assert not stale, f"out of date, run `make argocd-testdata` and review the diff: {stale}"


def test_argocd_cm_patch_embeds_the_health_check_verbatim():
    patch = yaml.safe_load(ARGOCD_CM_PATCH.read_text())
    assert (patch["apiVersion"], patch["kind"]) == ("v1", "ConfigMap")
    assert patch["metadata"] == {"name": "argocd-cm", "namespace": "argocd"}
    assert patch["data"] == {HEALTH_KEY: HEALTH_LUA.read_text()}
