"""The container images' Dockerfiles agree with what the rest of the project assumes.

No Docker engine here to build them, so what can drift is checked against its source of truth:
pinned versions against pyproject.toml, the user against the pods' runAsUser, the operator's
entry point and ports against the Helm chart, the trainer's command against the PyTorchJob builder.
"""

from __future__ import annotations

import importlib.util
import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from finetune_operator.config import OperatorConfig

ROOT = Path(__file__).resolve().parents[1]
TRAINER = ROOT / "trainer-image" / "Dockerfile"
OPERATOR = ROOT / "operator" / "Dockerfile"
CHART_VALUES = ROOT / "charts" / "finetune-operator" / "values.yaml"


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def last(dockerfile: Path, instruction: str) -> str:
    return [args for word, args in instructions(dockerfile) if word == instruction][-1]


def pyproject_pins() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += extra
    return {name.lower(): version for name, version in
            (re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^]]*\])?==(\S+)", r).groups()
             for r in requirements if "==" in r)}


@pytest.mark.parametrize("dockerfile", [TRAINER, OPERATOR], ids=["trainer", "operator"])
def test_base_image_is_pinned_to_a_tag(dockerfile):
    image = last(dockerfile, "FROM").split()[0]
    assert ":" in image and not image.endswith(":latest"), f"{dockerfile}: FROM {image} is not pinned"


@pytest.mark.parametrize("dockerfile", [TRAINER, OPERATOR], ids=["trainer", "operator"])
def test_pip_pins_match_pyproject(dockerfile):
    pins = pyproject_pins()
    pinned_here = re.findall(r'"?([A-Za-z0-9_.-]+)==([^"\s]+)"?', " ".join(
        args for word, args in instructions(dockerfile) if word == "RUN"))
    for name, version in pinned_here:
        assert pins.get(name.lower()) == version, f"{dockerfile}: {name}=={version}, pyproject pins {pins.get(name.lower())}"


@pytest.mark.parametrize("dockerfile", [TRAINER, OPERATOR], ids=["trainer", "operator"])
def test_runs_as_a_numeric_non_root_user(dockerfile):
    user = last(dockerfile, "USER").split(":")[0]
    assert user.isdigit() and int(user) > 0, f"{dockerfile}: USER {user} (restricted pods need a numeric non-root id)"


def test_trainer_image_user_is_the_pods_run_as_user():
    uid = int(last(TRAINER, "USER").split(":")[0])
    assert uid == OperatorConfig.model_fields["runAsUser"].default
    assert uid == yaml.safe_load(CHART_VALUES.read_text())["config"]["runAsUser"]


def test_trainer_image_installs_the_trainer_and_gpu_extras():
    installs = " ".join(args for word, args in instructions(TRAINER) if word == "RUN")
    assert re.search(r'pip install "?\.\[trainer,gpu\]"?', installs)
    assert "bitsandbytes" in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"][0]


def test_trainer_image_forbids_downloads_at_run_time():
    env = " ".join(args for word, args in instructions(TRAINER) if word == "ENV")
    assert "HF_HUB_OFFLINE=1" in env and "TRANSFORMERS_OFFLINE=1" in env


def test_the_modules_the_pods_run_exist():
    from finetune_operator.builders import run
    # The PyTorchJob builder's command and the image's CMD name modules of the installed package.
    for module in ("finetune_trainer", "finetune_trainer.launch"):
        assert importlib.util.find_spec(module) is not None
    assert "finetune_trainer.launch" in Path(run.__file__).read_text()
    assert json.loads(last(TRAINER, "CMD"))[:3] == ["python", "-m", "finetune_trainer"]


def test_operator_image_matches_the_chart():
    values = yaml.safe_load(CHART_VALUES.read_text())
    assert json.loads(last(OPERATOR, "ENTRYPOINT")) == values["command"]
    exposed = {int(p) for p in last(OPERATOR, "EXPOSE").split()}
    assert {values["config"]["operatorMetricsPort"], values["config"]["livenessPort"]} <= exposed
    # No torch in the operator image: only the base dependencies.
    installs = " ".join(args for word, args in instructions(OPERATOR) if word == "RUN")
    assert re.search(r"pip install \.(\s|$)", installs) and "[trainer" not in installs
