"""docs/argocd.md and argocd/argocd-cm-patch.yaml agree: the install command patches the ConfigMap the
patch is for, from the patch's path; the documented argocd-cm key (and its Helm-chart form) is the
patch's key; and the docs tell to set `useOpenLibs` exactly when the patch sets it."""

from __future__ import annotations

import re

import yaml

from tests.chart.argocd_cases import ARGOCD_CM_PATCH, HEALTH_KEY, HEALTH_LUA
from tests.chart.chartkit import REPO

DOCS = REPO / "docs" / "argocd.md"
USE_OPEN_LIBS = "resource.customizations.useOpenLibs."
HEALTH_PREFIX = "resource.customizations.health."
KUBECTL_PATCH = re.compile(r"kubectl -n (\S+) patch configmap (\S+) --type merge --patch-file (\S+)")


def docs() -> str:
    return DOCS.read_text()


def patch() -> dict:
    return yaml.safe_load(ARGOCD_CM_PATCH.read_text())


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", docs(), flags=re.S | re.M)


def install_section() -> str:
    return docs().split("### Installing it", 1)[1].split("\n## ", 1)[0]


def test_the_documented_kubectl_command_applies_the_patch_file_to_its_configmap():
    commands = [m for block in code_blocks("bash") for m in KUBECTL_PATCH.findall(block)]
    assert len(commands) == 1, commands
    namespace, name, patch_file = commands[0]
    assert REPO / patch_file == ARGOCD_CM_PATCH, f"docs patch {patch_file}"
    assert (namespace, name) == (patch()["metadata"]["namespace"], patch()["metadata"]["name"])
    assert f"`{ARGOCD_CM_PATCH.relative_to(REPO)}`" in install_section()
    # the command in the patch's own header is the documented one
    header = [line.lstrip("# ").strip() for line in ARGOCD_CM_PATCH.read_text().splitlines() if line.startswith("#")]
    assert KUBECTL_PATCH.search(" ".join(header)).groups() == commands[0]


def test_the_documented_key_is_the_patch_key():
    template = re.search(r"key\s+`(resource\.customizations\.health\.<group>_<kind>)`", install_section()).group(1)
    group, kind = HEALTH_KEY.removeprefix(HEALTH_PREFIX).split("_", 1)
    assert template.replace("<group>", group).replace("<kind>", kind) == HEALTH_KEY
    assert HEALTH_KEY in patch()["data"]
    assert f"`{HEALTH_LUA.relative_to(REPO)}`" in docs()  # the script the patch holds verbatim


def test_the_helm_chart_form_sets_the_same_keys_as_the_patch():
    helm = [yaml.safe_load(block) for block in code_blocks("yaml") if "configs:" in block]
    assert len(helm) == 1
    assert set(helm[0]["configs"]["cm"]) == set(patch()["data"])


def test_the_docs_set_use_open_libs_exactly_when_the_patch_does():
    patch_sets_it = any(key.startswith(USE_OPEN_LIBS) for key in patch()["data"])
    text = docs()
    says_not_needed = bool(re.search(r"[Nn]o `(resource\.customizations\.)?useOpenLibs` (key is )?needed", text))
    assert says_not_needed != patch_sets_it
    # every useOpenLibs key the docs name is for the resource of the health check
    named = re.findall(r"resource\.customizations\.useOpenLibs\.([\w.]+)", text)
    assert set(named) <= {HEALTH_KEY.removeprefix(HEALTH_PREFIX)}
    # no install instruction (a code block) sets it unless the patch does
    in_instructions = any("useOpenLibs" in block for block in code_blocks("bash") + code_blocks("yaml"))
    assert in_instructions == patch_sets_it
