"""The container images: their Dockerfiles agree with what the rest of the project assumes, and the
local builder (e2e/localcluster/images.py) tags them by a hash of exactly what goes into them.

Nothing here builds an image (the cluster tier uses the built ones): pinned versions are checked
against pyproject.toml, the users against the pods' and the chart's runAsUser, the operator's entry
point and ports against the Helm chart, the trainer's command against the PyTorchJob builder, the
hash against a table of changes that must and must not change it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest
import yaml

from e2e.localcluster import images
from finetune_operator.config import OperatorConfig

ROOT = Path(__file__).resolve().parents[1]
TRAINER = ROOT / "trainer-image" / "Dockerfile"
OPERATOR = ROOT / "operator" / "Dockerfile"
CHART_VALUES = ROOT / "charts" / "finetune-operator" / "values.yaml"
CHART_DEPLOYMENT = ROOT / "charts" / "finetune-operator" / "templates" / "deployment.yaml"
# What release builds use when no BASE_IMAGE is given.
RELEASE_BASES = {TRAINER: "nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04", OPERATOR: "python:3.12.11-slim-bookworm"}


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


def runs(dockerfile: Path) -> list[str]:
    return [args for word, args in instructions(dockerfile) if word == "RUN"]


def arg_defaults(dockerfile: Path) -> dict[str, str]:
    return dict(args.partition("=")[::2] for word, args in instructions(dockerfile) if word == "ARG")


def pyproject_pins() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += extra
    return {name.lower(): version for name, version in
            (re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^]]*\])?==(\S+)", r).groups()
             for r in requirements if "==" in r)}


# ---- the Dockerfiles ------------------------------------------------------------------------------

@pytest.mark.parametrize("dockerfile", [TRAINER, OPERATOR], ids=["trainer", "operator"])
def test_the_base_image_is_a_build_argument_whose_default_is_the_pinned_release_base(dockerfile):
    assert instructions(dockerfile)[0][0] == "ARG", "ARG BASE_IMAGE must come before FROM"
    assert last(dockerfile, "FROM") == "${BASE_IMAGE}"
    base = arg_defaults(dockerfile)["BASE_IMAGE"]
    assert base == RELEASE_BASES[dockerfile]
    assert ":" in base and not base.endswith(":latest"), f"{dockerfile}: BASE_IMAGE {base} is not pinned"


@pytest.mark.parametrize("dockerfile", [TRAINER, OPERATOR], ids=["trainer", "operator"])
def test_pip_pins_match_pyproject(dockerfile):
    pins = pyproject_pins()
    pinned_here = re.findall(r'"?([A-Za-z0-9_.-]+)==([^"\s]+)"?', " ".join(runs(dockerfile)))
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


def test_operator_image_user_is_the_charts_run_as_user():
    user, group = last(OPERATOR, "USER").split(":")
    template = CHART_DEPLOYMENT.read_text()
    assert user == re.search(r"runAsUser: (\d+)", template).group(1)
    assert group == re.search(r"runAsGroup: (\d+)", template).group(1)
    # The user exists in the image (useradd with that uid), so tools that look it up find a name.
    assert re.search(rf"useradd --uid {user} --gid {group}\b", " ".join(runs(OPERATOR)))


@pytest.mark.parametrize("dockerfile", [TRAINER, OPERATOR], ids=["trainer", "operator"])
def test_everything_goes_into_a_venv(dockerfile):
    """Debian's and Ubuntu's system Python are externally managed (PEP 668): pip only in /opt/venv."""
    env = " ".join(args for word, args in instructions(dockerfile) if word == "ENV")
    assert "VIRTUAL_ENV=/opt/venv" in env and "PATH=/opt/venv/bin:$PATH" in env
    assert re.search(r"python3 -m venv \$VIRTUAL_ENV", " ".join(runs(dockerfile)))
    assert "--break-system-packages" not in dockerfile.read_text()


@pytest.mark.parametrize("dockerfile", [TRAINER, OPERATOR], ids=["trainer", "operator"])
def test_dependencies_come_before_the_code_and_the_code_is_installed_without_them(dockerfile):
    """A change to the code rebuilds only the layers after the dependencies."""
    steps = instructions(dockerfile)
    copies = [i for i, (word, args) in enumerate(steps) if word == "COPY"]
    deps = next(i for i, (word, args) in enumerate(steps) if word == "RUN" and "-r /tmp/requirements.txt" in args)
    code = [i for i, (word, args) in enumerate(steps) if word == "COPY" and "finetune_" in args]
    assert steps[copies[0]][1] == "pyproject.toml ./" and copies[0] < deps < min(code)
    final = runs(dockerfile)[-1]
    assert re.search(r"pip install --no-cache-dir --no-deps --no-build-isolation \.(\s|$)", final)


@pytest.mark.parametrize("dockerfile,extras,expected,absent", [
    (TRAINER, "trainer,gpu", {"torch", "deepspeed", "peft", "transformers", "bitsandbytes", "kopf"}, set()),
    (TRAINER, "trainer", {"torch", "deepspeed", "peft", "transformers", "kopf"}, {"bitsandbytes"}),
    (OPERATOR, None, {"kopf", "lightkube", "pydantic", "boto3", "prometheus-client"}, {"torch", "deepspeed"}),
], ids=["trainer-release", "trainer-local", "operator"])
def test_the_requirements_the_image_installs_are_pyprojects(dockerfile, extras, expected, absent):
    """Run the Dockerfile's own one-liner that lists the requirements from pyproject.toml."""
    (code,) = re.findall(r'python -c "(import [^"]*tomllib[^"]*)"', " ".join(runs(dockerfile)))
    argv = [sys.executable, "-c", code] + ([extras] if extras is not None else [])
    listed = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    names = {re.split(r"[=<>\[ ]", r)[0].lower() for r in listed}
    assert expected <= names and not (absent & names)


def test_trainer_image_extras_default_to_the_release_image_and_the_local_image_leaves_gpu_out():
    defaults = arg_defaults(TRAINER)
    assert defaults["EXTRAS"] == "trainer,gpu" and defaults["PIP_UNINSTALL"] == "" and defaults["DS_BUILD_ENV"] == ""
    assert '"$EXTRAS"' in " ".join(runs(TRAINER)) and 'pip uninstall -y $PIP_UNINSTALL' in " ".join(runs(TRAINER))
    assert 'env DS_BUILD_OPS=0 $DS_BUILD_ENV pip install --no-cache-dir' in " ".join(runs(TRAINER))
    assert "bitsandbytes" in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"][0]
    # The CPU image compiles DeepSpeed's CPU communication op in (not in every pod at start).
    assert images.TRAINER.build_args == {"EXTRAS": "trainer", "PIP_UNINSTALL": "triton",
                                         "DS_BUILD_ENV": "DS_ACCELERATOR=cpu DS_BUILD_SHM_COMM=1"}
    # Every build argument the builder passes is declared (an undeclared one would be ignored).
    for spec in (images.TRAINER, images.OPERATOR):
        assert set(images.build_args(spec)) <= set(arg_defaults(spec.dockerfile))


def test_trainer_image_forbids_downloads_at_run_time():
    env = " ".join(args for word, args in instructions(TRAINER) if word == "ENV")
    assert "HF_HUB_OFFLINE=1" in env and "TRANSFORMERS_OFFLINE=1" in env


@pytest.mark.parametrize("dockerfile", [TRAINER, OPERATOR], ids=["trainer", "operator"])
def test_pip_gets_the_proxy_settings_as_build_secrets_never_in_the_image(dockerfile):
    """The steps that download mount pip.conf and the CA bundle as secrets (gone after the step);
    the image's environment names no certificate, index or proxy."""
    env = " ".join(args for word, args in instructions(dockerfile) if word == "ENV").upper()
    assert not re.search(r"CERT|CA_BUNDLE|INDEX|PROXY|TRUSTED", env)
    for run in runs(dockerfile):
        if re.search(r"pip install (?!--no-cache-dir --no-deps)", run):
            assert f"--mount=type=secret,id={images.PIP_CONF_SECRET},target=/etc/pip.conf" in run
            assert f"--mount=type=secret,id={images.PIP_CA_SECRET}" in run
            assert "--mount=type=cache,target=/root/.cache/pip" in run


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
    assert "[trainer" not in " ".join(runs(OPERATOR)) and "optional-dependencies" not in " ".join(runs(OPERATOR))


# ---- the local builder's specs ---------------------------------------------------------------------

def copy_sources(dockerfile: Path) -> list[str]:
    sources = []
    for word, args in instructions(dockerfile):
        if word in ("COPY", "ADD"):
            parts = [p for p in args.split() if not p.startswith("--")]
            sources += parts[:-1]
    return sources


@pytest.mark.parametrize("name", ["base", "pause", "trainer", "operator", "coredns"])
def test_every_file_a_dockerfile_copies_is_hashed(name):
    """The context holds only hashed files: a COPY of anything else would fail the build."""
    spec = images.coredns_spec(Path("/bin/true")) if name == "coredns" else images.IMAGES[name]
    provided = [*spec.inputs, *spec.extra_context, *(step.output for step in spec.steps)]
    for source in copy_sources(spec.dockerfile):
        assert any(Path(p).match(source.rstrip("*") + "*") or p == source.rstrip("/") for p in provided), \
            f"{spec.dockerfile}: COPY {source} is not among the spec's inputs {provided}"


def test_the_trainer_and_operator_contexts_keep_caches_out():
    for spec in (images.TRAINER, images.OPERATOR):
        files = [rel for rel, _ in images.context_files(spec)]
        assert "pyproject.toml" in files and "operator/finetune_operator/handlers.py" in files
        assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc") or ".egg-info" in f]
        assert "README.md" not in files, "an edit of the README would rebuild the images"


@pytest.mark.parametrize("path,ignored", [
    ("pyproject.toml", False), ("README.md", True), ("operator/finetune_operator/k8s.py", False),
    ("trainer-image/finetune_trainer/launch.py", False), (".venv/bin/python", True), (".cluster/state.json", True),
    (".git/HEAD", True), ("tests/test_images.py", True), ("docs/api.md", True), ("e2e/conftest.py", True),
    ("operator/finetune_operator/__pycache__/k8s.cpython-311.pyc", True), ("finetune_operator.egg-info/PKG-INFO", True),
    ("trainer-image/finetune_trainer/.pytest_cache/v", True),
])
def test_the_repositorys_dockerignore(path, ignored):
    assert images.is_ignored(path, images.dockerignore_patterns(ROOT)) is ignored


@pytest.mark.parametrize("patterns,path,ignored", [
    ("*.log", "a.log", True),
    ("*.log", "sub/a.log", False),                     # `*` does not cross folders
    ("**/*.log", "sub/deeper/a.log", True),
    ("**/*.log", "a.log", True),
    ("sub", "sub/deeper/a.py", True),                  # a matched folder takes its contents along
    ("sub\n!sub/keep.py", "sub/keep.py", False),       # the last matching pattern wins
    ("!sub/keep.py\nsub", "sub/keep.py", True),
    ("*\n!src\nsrc/**/*.tmp", "src/x/y.tmp", True),
    ("*\n!src\nsrc/**/*.tmp", "src/x/y.py", False),
    ("/abs/*.py", "abs/x.py", True),                   # a leading slash is the context root
    ("a?c", "abc", True), ("a?c", "a/c", False),
    ("[a-c]x", "bx", True), ("[!a-c]x", "bx", False),
    ("# a comment\n\n  spaced.txt  ", "spaced.txt", True),
])
def test_dockerignore_rules(tmp_path, patterns, path, ignored):
    (tmp_path / ".dockerignore").write_text(patterns + "\n")
    assert images.is_ignored(path, images.dockerignore_patterns(tmp_path)) is ignored


# ---- the hash ---------------------------------------------------------------------------------------

@pytest.fixture
def project(tmp_path):
    """A context with a Dockerfile, an input folder and a file outside the inputs; a base spec."""
    ctx = tmp_path / "ctx"
    (ctx / "pkg" / "sub").mkdir(parents=True)
    (ctx / "Dockerfile").write_text("ARG BASE_IMAGE\nFROM ${BASE_IMAGE}\nCOPY pkg /pkg\n")
    (ctx / "pkg" / "a.py").write_text("A = 1\n")
    (ctx / "pkg" / "sub" / "b.py").write_text("B = 2\n")
    (ctx / "pkg" / "notes.log").write_text("ignored\n")
    (ctx / "outside.txt").write_text("not an input\n")
    (ctx / ".dockerignore").write_text("**/*.log\n**/__pycache__\n")
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "Dockerfile").write_text("FROM scratch\nADD rootfs.tar /\n")
    (tmp_path / "extra.bin").write_bytes(b"\x7fELF binary")
    base = images.ImageSpec(name="tbase", dockerfile=tmp_path / "base" / "Dockerfile", context=tmp_path / "base",
                            steps=(images.HostStep("rootfs.tar", ("make-rootfs", "--suite=bookworm", "{out}")),))
    spec = images.ImageSpec(name="t", dockerfile=ctx / "Dockerfile", context=ctx, inputs=("pkg",),
                            build_args={"EXTRAS": "trainer"}, base=base,
                            extra_context={"extra.bin": tmp_path / "extra.bin"})
    return spec


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def after(effect):
    """A change made on disk: the spec stays the same."""
    return lambda spec: (effect(spec), spec)[1]


CHANGES = [
    # (what, change(spec) -> spec, changes the tag)
    ("an input file's content", after(lambda s: _write(s.context / "pkg" / "a.py", "A = 2\n")), True),
    ("a new file in an input folder", after(lambda s: _write(s.context / "pkg" / "sub" / "c.py", "")), True),
    ("a removed input file", after(lambda s: (s.context / "pkg" / "sub" / "b.py").unlink()), True),
    ("a renamed input file", after(lambda s: (s.context / "pkg" / "a.py").rename(s.context / "pkg" / "z.py")), True),
    ("an input file made executable", after(lambda s: (s.context / "pkg" / "a.py").chmod(0o755)), True),
    ("the Dockerfile", after(lambda s: _write(s.dockerfile, s.dockerfile.read_text() + "USER 1000\n")), True),
    ("a build argument's value", lambda s: dataclasses.replace(s, build_args={"EXTRAS": "trainer,gpu"}), True),
    ("a new build argument", lambda s: dataclasses.replace(s, build_args={**s.build_args, "X": "1"}), True),
    ("the base image's Dockerfile", after(lambda s: _write(s.base.dockerfile, "FROM scratch\nADD rootfs.tar /\nCMD [\"sh\"]\n")), True),
    ("the base image's host step", lambda s: dataclasses.replace(s, base=dataclasses.replace(
        s.base, steps=(images.HostStep("rootfs.tar", ("make-rootfs", "--suite=trixie", "{out}")),))), True),
    ("no base image", lambda s: dataclasses.replace(s, base=None), True),
    ("an extra context file's content", after(lambda s: s.extra_context["extra.bin"].write_bytes(b"other")), True),
    ("an extra context file's name", lambda s: dataclasses.replace(s, extra_context={"other.bin": s.extra_context["extra.bin"]}), True),
    ("a new input", lambda s: dataclasses.replace(s, inputs=(*s.inputs, "outside.txt")), True),
    ("an ignored file in an input folder", after(lambda s: _write(s.context / "pkg" / "notes.log", "changed\n")), False),
    ("a new ignored folder", after(lambda s: _write(s.context / "pkg" / "__pycache__" / "a.cpython-311.pyc", "x")), False),
    ("a file outside the inputs", after(lambda s: _write(s.context / "outside.txt", "changed\n")), False),
    ("an input file touched, same content", after(lambda s: os.utime(s.context / "pkg" / "a.py", (1, 1))), False),
    ("the same spec made anew", lambda s: dataclasses.replace(s), False),
]


@pytest.mark.parametrize("what,change,changes", CHANGES, ids=[c[0] for c in CHANGES])
def test_what_changes_the_tag(project, what, change, changes):
    before = images.ref(project)
    after = images.ref(change(project))
    assert (before != after) is changes, what


def test_the_reference_names_the_image_and_twelve_hex_digits(project):
    assert re.fullmatch(r"localhost/finetune-t:[0-9a-f]{12}", images.ref(project))
    assert images.build_args(project)["BASE_IMAGE"] == images.ref(project.base)


def test_the_archive_lives_in_the_machine_cache(project, tmp_path, monkeypatch):
    monkeypatch.setenv("FTO_CACHE_DIR", str(tmp_path / "cache"))
    tag = images.ref(project).rsplit(":", 1)[1]
    assert images.archive_path(project) == tmp_path / "cache" / "images" / f"t-{tag}.oci.tar"


def test_a_present_archive_is_not_rebuilt(project, tmp_path, monkeypatch):
    monkeypatch.setenv("FTO_CACHE_DIR", str(tmp_path / "cache"))
    archive = images.archive_path(project)
    archive.parent.mkdir(parents=True)
    archive.write_bytes(b"built before")
    monkeypatch.setattr(images, "_build", lambda *a, **k: pytest.fail("rebuilt a cached image"))
    assert images.ensure_built(project, log=lambda _: None) == archive


def test_a_stale_archive_goes_before_the_build_and_the_older_buildah_image_after(project, tmp_path, monkeypatch):
    monkeypatch.setenv("FTO_CACHE_DIR", str(tmp_path / "cache"))
    spec = dataclasses.replace(project, base=None)
    stale = images.images_dir() / "t-0123456789ab.oci.tar"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"an older tree's image")
    seen = []
    monkeypatch.setattr(images.debian, "ensure_packages", lambda *a, **k: None)
    monkeypatch.setattr(images, "_build", lambda *a, **k: seen.append(("build", stale.exists())))
    monkeypatch.setattr(images, "_export", lambda ref, archive: archive.write_bytes(b"new"))
    monkeypatch.setattr(images, "_prune_buildah", lambda s: seen.append(("prune buildah", images.archive_path(s).exists())))
    assert images.ensure_built(spec, log=lambda _: None) == images.archive_path(spec)
    assert seen == [("build", False), ("prune buildah", True)]


@pytest.mark.parametrize("error,log,explained", [
    ("buildah bud ... failed (exit 125); write /x/storage/1: no space left on device", "", True),
    ("buildah bud ... failed (exit 125); the end of the log: (cut)", "Error: writing blob: No space left on device\n", True),
    ("buildah bud ... failed (exit 1); pip: no matching distribution", "ERROR: No matching distribution\n", False),
])
def test_a_build_that_fills_the_disk_says_so(project, tmp_path, monkeypatch, error, log, explained):
    monkeypatch.setenv("FTO_CACHE_DIR", str(tmp_path / "cache"))
    _write(images._log_file(project), log)
    result = images._explain_full_disk(project, images.BuildError(error))
    if explained:
        assert "ran out of disk" in str(result) and "GB free now" in str(result)
        assert "FTO_CACHE_DIR" in str(result) and str(images._log_file(project)) in str(result)
    else:
        assert str(result) == error


def test_the_context_holds_exactly_the_hashed_files(project, tmp_path, monkeypatch):
    monkeypatch.setenv("FTO_CACHE_DIR", str(tmp_path / "cache"))
    context = tmp_path / "assembled"
    context.mkdir()
    project = dataclasses.replace(project, steps=(images.HostStep("made.txt", ("sh", "-c", "echo made > {out}")),))
    images._assemble_context(project, context, tmp_path / "log")
    found = sorted(p.relative_to(context).as_posix() for p in context.rglob("*"))
    assert found == ["extra.bin", "made.txt", "pkg", "pkg/a.py", "pkg/sub", "pkg/sub/b.py"]
    assert (context / "made.txt").read_text() == "made\n"


# ---- pip's configuration for the builds -------------------------------------------------------------

def test_pip_secrets_carry_the_hosts_settings_with_the_ca_at_the_mounted_path(tmp_path, monkeypatch):
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\nproxy\n-----END CERTIFICATE-----\n")
    conf = tmp_path / "pip.conf"
    conf.write_text(f"[global]\ncert = {ca}\nindex-url = https://pypi.example/simple\n[install]\nfind-links = /opt/wheels\n")
    for key in [k for k in os.environ if k.startswith("PIP_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    monkeypatch.setenv("PIP_DEFAULT_TIMEOUT", "180")
    monkeypatch.setenv("PIP_FIND_LINKS", "/opt/wheels")
    args = images._pip_secrets(tmp_path / "secrets")
    assert args == [f"--secret=id=pip-ca,src={tmp_path / 'secrets' / 'pip-ca'}",
                    f"--secret=id=pip.conf,src={tmp_path / 'secrets' / 'pip.conf'}"]
    assert (tmp_path / "secrets" / "pip-ca").read_text() == ca.read_text()
    written = (tmp_path / "secrets" / "pip.conf").read_text()
    assert "cert = /run/secrets/pip-ca" in written and "index-url = https://pypi.example/simple" in written
    assert "default-timeout = 180" in written
    assert "/opt/wheels" not in written and str(ca) not in written   # host-only paths left out


# ---- the OCI archive -----------------------------------------------------------------------------

def _docker_archive(path: Path, layer: bytes, reference: str) -> str:
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"User": "65535"},
                         "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    with tarfile.open(path, "w") as t:
        for name, data in [(diff_id[7:] + ".tar", layer), (config_name, config),
                           ("manifest.json", json.dumps([{"Config": config_name, "RepoTags": [reference],
                                                          "Layers": ["abc/layer.tar"]}]).encode())]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("abc/layer.tar")
        link.type, link.linkname = tarfile.SYMTYPE, "../" + diff_id[7:] + ".tar"
        t.addfile(link)
    return diff_id


def test_a_docker_archive_becomes_an_oci_layout_with_uncompressed_layers(tmp_path):
    layer_buffer = io.BytesIO()
    with tarfile.open(fileobj=layer_buffer, mode="w") as layer_tar:
        info = tarfile.TarInfo("pause")
        info.size = 4
        layer_tar.addfile(info, io.BytesIO(b"\x7fELF"))
    layer = layer_buffer.getvalue()
    diff_id = _docker_archive(tmp_path / "d.tar", layer, "localhost/finetune-x:0123456789ab")
    with open(tmp_path / "d.tar", "rb") as stream:
        images.docker_to_oci(stream, tmp_path / "o.tar", "localhost/finetune-x:0123456789ab")
    with tarfile.open(tmp_path / "o.tar") as t:
        blobs = {m.name: t.extractfile(m).read() for m in t if m.isfile()}
    assert json.loads(blobs["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    (entry,) = json.loads(blobs["index.json"])["manifests"]
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == "localhost/finetune-x:0123456789ab"
    for name, data in blobs.items():   # every blob is stored under its digest
        if name.startswith("blobs/sha256/"):
            assert hashlib.sha256(data).hexdigest() == name.rsplit("/", 1)[1]
    manifest = json.loads(blobs["blobs/sha256/" + entry["digest"][7:]])
    assert manifest["layers"] == [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": diff_id,
                                   "size": len(layer)}]
    assert blobs["blobs/sha256/" + diff_id[7:]] == layer
    assert json.loads(blobs["blobs/sha256/" + manifest["config"]["digest"][7:]])["config"]["User"] == "65535"


def test_a_layer_missing_from_the_archive_is_refused(tmp_path):
    _docker_archive(tmp_path / "d.tar", b"layer bytes", "localhost/finetune-x:0")
    with tarfile.open(tmp_path / "d.tar") as t:
        members = [(m, t.extractfile(m).read() if m.isfile() else None) for m in t]
    with tarfile.open(tmp_path / "bad.tar", "w") as t:
        for member, data in members:
            if not member.name.endswith(".tar"):
                t.addfile(member, io.BytesIO(data) if data is not None else None)
    with pytest.raises(images.BuildError, match="is not in the archive"), open(tmp_path / "bad.tar", "rb") as stream:
        images.docker_to_oci(stream, tmp_path / "o.tar", "localhost/finetune-x:0")


# ---- the node's image store, filled ahead by `make cluster-build` --------------------------------------

@pytest.fixture
def store_env(project, tmp_path, monkeypatch):
    """A machine cache in tmp_path holding the project's archive (a one-layer image), and an owner file of
    the test's own (the machine's is the running cluster's)."""
    monkeypatch.setenv("FTO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(images.node, "NODE_OWNER_FILE", tmp_path / "node-owner.json")
    layer_buffer = io.BytesIO()
    with tarfile.open(fileobj=layer_buffer, mode="w") as layer_tar:
        info = tarfile.TarInfo("hello.txt")
        info.size = 6
        layer_tar.addfile(info, io.BytesIO(b"hello\n"))
    _docker_archive(tmp_path / "d.tar", layer_buffer.getvalue(), images.ref(project))
    archive = images.archive_path(project)
    archive.parent.mkdir(parents=True)
    with open(tmp_path / "d.tar", "rb") as stream:
        images.docker_to_oci(stream, archive, images.ref(project))
    return project


def _store_images(store: Path, state: Path) -> tuple[list[str], list[str]]:
    """The image references and snapshots a containerd started on the store finds (namespace k8s.io)."""
    socket = state / "c.sock"
    state.mkdir()
    (state / "config.toml").write_text(images.node.image_store_config(store, state, socket))
    proc = subprocess.Popen(["containerd", f"--config={state / 'config.toml'}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        ctr = ["ctr", "--address", str(socket), "--namespace", "k8s.io"]
        images.wait_until(lambda: images.node.containerd_answers(socket), 30, "containerd")
        listed = subprocess.run([*ctr, "images", "ls", "-q"], capture_output=True, text=True, check=True).stdout.split()
        snapshots = subprocess.run([*ctr, "snapshots", "ls"], capture_output=True, text=True, check=True).stdout
        return listed, snapshots.splitlines()[1:]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_cluster_build_imports_the_images_unpacked_into_the_store_the_node_opens(store_env, tmp_path):
    """A real containerd of its own imports the image; one started later on the same store (as the node's
    is) finds it unpacked. The containerd is gone afterwards and so is its claim on the node."""
    said = []
    images.preload_node_store([store_env], log=said.append)
    assert any("image store holds t" in line for line in said), said
    assert not images.node.NODE_OWNER_FILE.exists()
    assert json.loads((images.containerd_store() / images.PRELOADED_FILE).read_text()) == [images.ref(store_env)]
    listed, snapshots = _store_images(images.containerd_store(), tmp_path / "later")
    assert images.ref(store_env) in listed and snapshots


def test_a_store_that_holds_the_images_already_starts_no_containerd(store_env, monkeypatch):
    store = images.containerd_store()
    store.mkdir(parents=True)
    (store / images.PRELOADED_FILE).write_text(json.dumps([images.ref(store_env)]))
    monkeypatch.setattr(images, "start_logged", lambda *a, **k: pytest.fail("started a containerd"))
    images.preload_node_store([store_env], log=lambda _: None)


@pytest.mark.parametrize("owner, left_alone", [
    ({"root": "/checkout/.cluster", "containerd": os.getpid()}, True),   # a node runs on the store
    ({"root": "/checkout/.cluster"}, True),                              # a cluster's start, its containerd not yet up
    ({"root": "/checkout/.cluster", "containerd": 2 ** 22 + 1}, False),  # a node that is gone
], ids=["node-running", "node-starting", "node-gone"])
def test_a_store_in_use_is_left_to_the_clusters_start(store_env, monkeypatch, owner, left_alone):
    images.node.NODE_OWNER_FILE.write_text(json.dumps(owner))
    if left_alone:
        monkeypatch.setattr(images, "start_logged", lambda *a, **k: pytest.fail("started a containerd on a store in use"))
    said = []
    images.preload_node_store([store_env], log=said.append)
    if left_alone:
        assert said == ["the node's image store is in use (/checkout/.cluster): the images are imported when the "
                        "cluster starts"]
    else:
        assert any("image store holds t" in line for line in said), said


def test_a_failed_import_is_reported_and_leaves_no_containerd_and_no_claim(store_env, monkeypatch):
    def refuse(*args, **kwargs):
        raise images.BuildError("ctr images import failed (exit 1): no space left on device")

    monkeypatch.setattr(images, "import_into_containerd", refuse)
    started = []
    real_start = images.start_logged
    monkeypatch.setattr(images, "start_logged", lambda *a, **k: started.append(real_start(*a, **k)) or started[-1])
    said = []
    images.preload_node_store([store_env], log=said.append)
    assert said == ["importing the images into the node's image store failed (ctr images import failed (exit 1): "
                    "no space left on device); the cluster's start imports them"]
    (proc,) = started
    assert proc.poll() is not None   # stopped
    assert not images.node.NODE_OWNER_FILE.exists()
    assert not (images.containerd_store() / images.PRELOADED_FILE).exists()


# ---- the base, pause and coredns images ---------------------------------------------------------------

def test_the_base_image_is_debian_from_the_hosts_mirror_with_what_both_dockerfiles_need():
    argv = images.BASE.steps[0].argv
    assert "--variant=minbase" in argv and images.DEBIAN_SUITE in argv
    included = next(a for a in argv if a.startswith("--include=")).split("=", 1)[1].split(",")
    assert {"python3", "python3-venv", "ca-certificates", "passwd"} <= set(included)
    assert all(s.split()[1].startswith("http://deb.debian.org/") for s in images.DEBIAN_SOURCES)
    hook = next(a for a in argv if a.startswith("--customize-hook="))
    assert '/etc/resolv.conf' in hook and '/etc/hostname' in hook   # nothing of the build host


@pytest.mark.parametrize("name,user,entrypoint", [("pause", "65535:65535", ["/pause"]),
                                                 ("coredns", "65532:65532", ["/coredns"])])
def test_the_node_images_are_from_scratch_and_non_root(name, user, entrypoint):
    spec = images.coredns_spec(Path("/usr/bin/true")) if name == "coredns" else images.IMAGES[name]
    assert last(spec.dockerfile, "FROM") == "scratch"
    assert last(spec.dockerfile, "USER") == user
    assert json.loads(last(spec.dockerfile, "ENTRYPOINT")) == entrypoint


def test_the_pause_program_compiles_statically_and_exits_on_sigterm(tmp_path):
    argv = [a.replace("{out}", str(tmp_path / "pause")).replace("{context}", str(images.PAUSE.context))
            for a in images.PAUSE.steps[0].argv]
    if subprocess.run(["sh", "-c", "command -v gcc"], capture_output=True).returncode != 0:
        pytest.skip("no gcc")
    subprocess.run(argv, check=True)
    assert subprocess.run([tmp_path / "pause", "-v"], capture_output=True, text=True).stdout.startswith("finetune-pause")
    proc = subprocess.Popen([tmp_path / "pause"], stderr=subprocess.DEVNULL)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=0.3)
        proc.terminate()
        assert proc.wait(timeout=5) == 0
    finally:
        proc.kill()


def test_the_cli_names_the_images(capsys):
    assert images.main(["ref", "trainer"]) == 0
    assert capsys.readouterr().out.strip() == images.ref(images.TRAINER)
    assert images.main(["ref", "coredns", "--coredns-binary", "/usr/bin/true"]) == 0
    assert capsys.readouterr().out.strip().startswith("localhost/finetune-coredns:")


CTR_LISTING = """REF TYPE DIGEST SIZE PLATFORMS LABELS
localhost/finetune-trainer:new application/vnd.oci.image.manifest.v1+json sha256:aaa 5.2 GiB linux/amd64 io.cri-containerd.image=managed
sha256:idnew application/vnd.oci.image.manifest.v1+json sha256:aaa 5.2 GiB linux/amd64 io.cri-containerd.image=managed
localhost/finetune-trainer:old application/vnd.oci.image.manifest.v1+json sha256:bbb 5.2 GiB linux/amd64 io.cri-containerd.image=managed
sha256:idold application/vnd.oci.image.manifest.v1+json sha256:bbb 5.2 GiB linux/amd64 io.cri-containerd.image=managed
localhost/finetune-trainer:same-as-new application/vnd.oci.image.manifest.v1+json sha256:aaa 5.2 GiB linux/amd64 -
localhost/finetune-operator:old application/vnd.oci.image.manifest.v1+json sha256:ccc 440 MiB linux/amd64 -
sha256:idoperator application/vnd.oci.image.manifest.v1+json sha256:ccc 440 MiB linux/amd64 -
sha256:idorphan application/vnd.oci.image.manifest.v1+json sha256:ddd 5.2 GiB linux/amd64 io.cri-containerd.image=managed
"""


@pytest.mark.parametrize("reference,stale", [
    ("localhost/finetune-trainer:new", ["localhost/finetune-trainer:old", "sha256:idold", "sha256:idorphan"]),
    ("localhost/finetune-operator:old", ["sha256:idorphan"]),
], ids=["the older tag and every id record left untagged go", "another image's tags stay"])
def test_an_import_removes_older_versions_and_untagged_records(reference, stale):
    assert images.stale_image_records(CTR_LISTING, reference) == stale
