"""The project's container images, built on this machine without Docker and cached by content.

`buildah bud` builds each image from its Dockerfile (the trainer's and the operator's are the
release Dockerfiles, given a local base through the BASE_IMAGE build argument); the base is Debian
bookworm made from Debian's packages by mmdebstrap. An image's tag is a hash over everything that
goes into it: the Dockerfile, the build arguments, the base image's hash, the files the build may
copy (after `.dockerignore`) and the files made on the host for it. A built image is kept as an
uncompressed OCI archive under `cache_dir()/images/` and never rebuilt; buildah's storage (the
layer cache) and pip's download cache live under `cache_dir()/buildah/`.

Network inside the builds: RUN steps use the host's network and resolv.conf. pip gets the host's
configuration (/etc/pip.conf, PIP_* variables, the CA bundle of a TLS-intercepting proxy) as build
secrets, mounted for the RUN steps that ask for them and never written into a layer or the image's
configuration (see `_pip_secrets`).

    python3 -m e2e.localcluster.images build [NAME...]     # base, pause, trainer, operator
    python3 -m e2e.localcluster.images list
    python3 -m e2e.localcluster.images ref NAME

Only the standard library: `make cluster-build` runs this with the system python3.
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import fcntl
import functools
import hashlib
import io
import json
import os
import platform
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, Iterator

from . import debian, node
from .paths import REPO_ROOT, cache_dir
from .procs import pid_alive, start_logged, terminate_group, wait_until

IMAGES_DIR = Path(__file__).resolve().parent / "images"
REGISTRY = "localhost"
PREFIX = "finetune-"
# Part of every hash: bump it when a change here changes what gets built.
BUILDER_VERSION = "1"
# The trainer's and the operator's Dockerfiles mount these build secrets for pip (see _pip_secrets).
PIP_CONF_SECRET = "pip.conf"
PIP_CA_SECRET = "pip-ca"

Log = Callable[[str], object]


class BuildError(RuntimeError):
    pass


@dataclass(frozen=True)
class HostStep:
    """A file made on the host before the build and put into the build context as `output`.

    In `argv`, `{out}` is the file to write and `{context}` the spec's context folder; argv and env
    are hashed (not the output, which need not be reproducible bit for bit).
    """
    output: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ImageSpec:
    """One image: `buildah bud -f dockerfile` over a context holding exactly what is hashed."""
    name: str                                   # the image is localhost/finetune-<name>:<hash12>
    dockerfile: Path
    context: Path                               # `inputs` and `.dockerignore` are relative to it
    inputs: tuple[str, ...] = ()                # files and folders the Dockerfile may COPY or ADD
    build_args: dict[str, str] = field(default_factory=dict)
    base: ImageSpec | None = None               # built first; passed as the build argument BASE_IMAGE
    extra_context: dict[str, Path] = field(default_factory=dict)  # name in the context -> host file
    steps: tuple[HostStep, ...] = ()


# ---- the images ---------------------------------------------------------------------------------

# The mirror the host's apt uses (/etc/apt/sources.list.d/debian.sources), over plain HTTP like apt.
DEBIAN_SUITE = "bookworm"
DEBIAN_SOURCES = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
# What both Dockerfiles need from the base besides apt: Python with venv, the CA bundle, useradd.
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates", "passwd")
BASE_SOURCE_DATE_EPOCH = "1704067200"  # file times clamped to 2024-01-01 (Debian's .pyc are hash-checked)
_ETC_HOSTS = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"

BASE = ImageSpec(
    name="base",
    dockerfile=IMAGES_DIR / "base" / "Dockerfile",
    context=IMAGES_DIR / "base",
    steps=(HostStep(
        output="rootfs.tar",
        argv=(
            "mmdebstrap", "--variant=minbase", "--mode=root", "--format=tar",
            # merged /usr by the hook (debootstrap's way) instead of the usrmerge package and its perl
            "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
            "--include=" + ",".join(BASE_PACKAGES),
            *(f"--dpkgopt={o}" for o in ("path-exclude=/usr/share/man/*", "path-exclude=/usr/share/doc/*",
                                          "path-include=/usr/share/doc/*/copyright",
                                          "path-exclude=/usr/share/locale/*", "path-exclude=/usr/share/info/*")),
            # Nothing of the build host: mmdebstrap copies its resolv.conf and hostname in.
            '--customize-hook=: > "$1/etc/resolv.conf"; : > "$1/etc/hostname"; '
            f'printf "{_ETC_HOSTS.encode("unicode_escape").decode()}" > "$1/etc/hosts"; '
            'chmod 644 "$1/etc/resolv.conf" "$1/etc/hostname" "$1/etc/hosts"',
            DEBIAN_SUITE, "{out}", *DEBIAN_SOURCES,
        ),
        env=(("SOURCE_DATE_EPOCH", BASE_SOURCE_DATE_EPOCH),),
    ),),
)

PAUSE = ImageSpec(
    name="pause",
    dockerfile=IMAGES_DIR / "pause" / "Dockerfile",
    context=IMAGES_DIR / "pause",
    inputs=("pause.c",),
    steps=(HostStep("pause", ("gcc", "-static", "-Os", "-s", "-Wall", "-Wextra", "-Werror",
                              "-o", "{out}", "{context}/pause.c")),),
)

# The local cluster's CPU trainer: no bitsandbytes (the `gpu` extra), no triton (GPU kernels), and
# DeepSpeed's CPU communication op compiled in (trainer-image/Dockerfile, DS_BUILD_ENV).
TRAINER = ImageSpec(
    name="trainer",
    dockerfile=REPO_ROOT / "trainer-image" / "Dockerfile",
    context=REPO_ROOT,
    inputs=("pyproject.toml", "LICENSE", "operator/finetune_operator", "trainer-image/finetune_trainer"),
    build_args={"EXTRAS": "trainer", "PIP_UNINSTALL": "triton",
                "DS_BUILD_ENV": "DS_ACCELERATOR=cpu DS_BUILD_SHM_COMM=1"},
    base=BASE,
)

OPERATOR = ImageSpec(
    name="operator",
    dockerfile=REPO_ROOT / "operator" / "Dockerfile",
    context=REPO_ROOT,
    inputs=("pyproject.toml", "LICENSE", "operator/finetune_operator", "trainer-image/finetune_trainer"),
    base=BASE,
)

IMAGES: dict[str, ImageSpec] = {spec.name: spec for spec in (BASE, PAUSE, TRAINER, OPERATOR)}


def coredns_spec(binary: Path) -> ImageSpec:
    """CoreDNS from a static binary built elsewhere (the local cluster's Go build)."""
    return ImageSpec(
        name="coredns",
        dockerfile=IMAGES_DIR / "coredns" / "Dockerfile",
        context=IMAGES_DIR / "coredns",
        extra_context={"coredns": Path(binary)},
    )


# ---- hashing ------------------------------------------------------------------------------------

def ref(spec: ImageSpec) -> str:
    """The image's reference, e.g. localhost/finetune-trainer:0123456789ab."""
    return f"{REGISTRY}/{PREFIX}{spec.name}:{content_hash(spec)[:12]}"


def content_hash(spec: ImageSpec) -> str:
    h = hashlib.sha256()

    def put(*parts: str | bytes) -> None:
        for part in parts:
            data = part.encode() if isinstance(part, str) else part
            h.update(len(data).to_bytes(8, "big") + data)

    put("builder", BUILDER_VERSION, platform.machine())
    put("dockerfile", spec.dockerfile.read_bytes())
    for key, value in sorted(build_args(spec).items()):
        put("arg", key, value)
    for step in spec.steps:
        put("step", step.output, *step.argv, *(f"{k}={v}" for k, v in step.env))
    for rel, path in context_files(spec):
        put("input", rel, *_entry_digest(path))
    for name, path in sorted(spec.extra_context.items()):
        put("extra", name, *_entry_digest(Path(path)))
    return h.hexdigest()


def build_args(spec: ImageSpec) -> dict[str, str]:
    return {**spec.build_args, **({"BASE_IMAGE": ref(spec.base)} if spec.base else {})}


def context_files(spec: ImageSpec) -> list[tuple[str, Path]]:
    """(path relative to the context, host path) of every input, folders walked, `.dockerignore`d
    paths left out; sorted. Exactly these make up the build context."""
    patterns = dockerignore_patterns(spec.context)
    out: dict[str, Path] = {}
    for item in spec.inputs:
        top = spec.context / item
        if not top.exists() and not top.is_symlink():
            raise FileNotFoundError(f"{spec.name}: input {item} not found in {spec.context}")
        for path in _walk(top):
            rel = path.relative_to(spec.context).as_posix()
            if not is_ignored(rel, patterns):
                out[rel] = path
    return sorted(out.items())


def _walk(top: Path) -> Iterator[Path]:
    yield top
    if top.is_dir() and not top.is_symlink():
        for child in sorted(top.iterdir()):
            yield from _walk(child)


def _entry_digest(path: Path) -> tuple[str, ...]:
    st = path.lstat()
    mode = f"{stat.S_IMODE(st.st_mode):o}"
    if stat.S_ISLNK(st.st_mode):
        return ("link", os.readlink(path))
    if stat.S_ISDIR(st.st_mode):
        return ("dir", mode)
    return ("file", mode, _file_sha256(str(path), st.st_size, st.st_mtime_ns, st.st_ino))


@functools.lru_cache(maxsize=4096)
def _file_sha256(path: str, size: int, mtime_ns: int, inode: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# ---- .dockerignore (Docker's rules: Go's filepath.Match plus `**`, `!` exceptions, the last
# matching pattern wins, a pattern that matches a folder matches everything in it) -------------------

def dockerignore_patterns(context: Path) -> list[tuple[bool, re.Pattern]]:
    """(is an exception, regex) per line of context/.dockerignore."""
    file = context / ".dockerignore"
    if not file.exists():
        return []
    patterns = []
    for line in file.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = os.path.normpath(line[1:].strip() if exception else line).lstrip("/")
        if pattern and pattern != ".":
            patterns.append((exception, _glob_regex(pattern)))
    return patterns


def _glob_regex(pattern: str) -> re.Pattern:
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                i += 1
                out.append("(?:.*/)?")
            else:
                out.append(".*")
            continue
        c = pattern[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and (end := pattern.find("]", i + 2)) != -1:
            body = pattern[i + 1:end]
            out.append("[" + ("^" + body[1:] if body[0] in "^!" else body).replace("\\", "\\\\") + "]")
            i = end
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out))


def is_ignored(rel: str, patterns: list[tuple[bool, re.Pattern]]) -> bool:
    parts = rel.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for exception, regex in patterns:
        if any(regex.fullmatch(c) for c in candidates):
            ignored = not exception
    return ignored


# ---- building -----------------------------------------------------------------------------------

def images_dir() -> Path:
    return cache_dir() / "images"


def containerd_store() -> Path:
    """The real node's containerd root: images imported once per machine, not per checkout."""
    return cache_dir() / "containerd"


def buildah_dir() -> Path:
    return cache_dir() / "buildah"


def archive_path(spec: ImageSpec) -> Path:
    return images_dir() / f"{spec.name}-{content_hash(spec)[:12]}.oci.tar"


def ensure_built(spec: ImageSpec, log: Log = print) -> Path:
    """The image's OCI archive (uncompressed layers), built first if it is not in the cache."""
    archive = archive_path(spec)
    if archive.exists():
        return archive
    with _locked(images_dir() / f".{spec.name}.lock"):
        if archive.exists():
            return archive
        if spec.base is not None:
            ensure_built(spec.base, log=log)
        debian.ensure_packages(debian.BUILD_PACKAGES, log=log)
        t0 = time.monotonic()
        reference = ref(spec)
        log(f"building image {reference} (log: {_log_file(spec)})")
        if spec.base is not None:
            _ensure_in_storage(spec.base)
        # An older archive is stale for this tree: it goes now, not after the build, so that it does
        # not share the disk with the new layers. buildah's older image stays until then: its layers
        # are the build cache (a change to the sources alone reuses the pip layer).
        _prune_archives(spec, keep=archive)
        try:
            _build(spec, reference, log)
            _export(reference, archive)
        except BuildError as e:
            raise _explain_full_disk(spec, e) from e
        _prune_buildah(spec)
        log(f"built {reference} in {time.monotonic() - t0:.0f}s: {archive} ({archive.stat().st_size / 1e6:.0f} MB)")
    return archive


def import_into_containerd(spec: ImageSpec, address: Path, log: Log = print) -> str:
    """Import the image into the containerd at `address` (namespace k8s.io, unpacked) unless that
    containerd already has it; returns its reference.

    Only the blobs that containerd's content store lacks are sent (`ctr images import` rewrites
    every blob it is given, 5 GB for the trainer even when only its last layer is new)."""
    reference = ref(spec)
    ctr = ["ctr", "--address", str(address), "--namespace", "k8s.io"]
    if reference in _ctr_lines(ctr, "images", "ls", "-q"):
        return reference
    archive = ensure_built(spec, log=log)
    present = set(_ctr_lines(ctr, "content", "ls", "-q"))
    t0 = time.monotonic()
    sent = 0
    with tempfile.TemporaryFile() as output:
        proc = subprocess.Popen([*ctr, "images", "import", "-"], stdin=subprocess.PIPE, stdout=output,
                                stderr=subprocess.STDOUT)
        try:
            with tarfile.open(archive) as src, \
                    tarfile.open(fileobj=proc.stdin, mode="w|", bufsize=_COPY_BUFFER, copybufsize=_COPY_BUFFER) as dst:
                for member in src:
                    if member.name.startswith("blobs/sha256/") and f"sha256:{member.name[13:]}" in present:
                        continue
                    dst.addfile(member, src.extractfile(member) if member.isfile() else None)
                    sent += member.size
        except BrokenPipeError:
            pass  # ctr stopped reading: its exit status and output say why
        finally:
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
            returncode = proc.wait()
        output.seek(0)
        said = output.read().decode(errors="replace")
    listing = _ctr_output(ctr, "images", "ls")
    if returncode != 0 or reference not in image_records(listing):
        raise BuildError(f"ctr images import of {archive} failed (exit {returncode}): {said}")
    # Older versions of the image go (containers that still run keep their snapshots).
    older = stale_image_records(listing, reference)
    if older:
        subprocess.run([*ctr, "images", "rm", *older], capture_output=True, check=False)
    log(f"imported {reference} into containerd in {time.monotonic() - t0:.1f}s ({sent / 1e6:.0f} MB sent)")
    return reference


# In the image store: the references `preload_node_store` imported last (a later run with the same
# images starts no containerd).
PRELOADED_FILE = "preloaded-by-cluster-build.json"


def preload_node_store(specs: list[ImageSpec], log: Log = print) -> None:
    """Import the images into the node's image store (`containerd_store()`) before any node runs, with
    a containerd of its own for as long as it takes: `make cluster-build` does this beside the Go builds,
    so that a new machine's first cluster start does not spend minutes importing the 5.5 GB trainer.

    Best effort: when a node holds the store, or anything fails, the cluster's start imports whatever
    the store lacks, as it does at every start."""
    store = containerd_store()
    marker = store / PRELOADED_FILE
    wanted = sorted(ref(spec) for spec in specs)
    with contextlib.suppress(OSError, ValueError):
        if json.loads(marker.read_text()) == wanted:
            return
    owner = node.node_owner()
    if owner and (pid_alive(owner.get("containerd", 0)) or "containerd" not in owner):
        log(f"the node's image store is in use ({owner.get('purpose') or owner.get('root')}): the images are "
            f"imported when the cluster starts")
        return
    t0 = time.monotonic()
    store.mkdir(parents=True, exist_ok=True)
    state = Path(tempfile.mkdtemp(prefix="fto-image-store-"))
    socket = state / "containerd.sock"
    config = state / "config.toml"
    config.write_text(node.image_store_config(store, state, socket))
    log_file = images_dir() / "logs" / "image-store.log"
    proc = start_logged(["containerd", f"--config={config}"], log_file)
    node.NODE_OWNER_FILE.write_text(json.dumps({
        "root": str(store), "containerd": proc.pid,
        "purpose": f"make cluster-build, importing images into the node's image store (pid {os.getpid()})"}))
    try:
        wait_until(lambda: node.containerd_answers(socket), 60, "containerd on the image store", proc=proc,
                   log_file=log_file)
        for spec in specs:
            import_into_containerd(spec, socket, log=log)
        marker.write_text(json.dumps(wanted))
        log(f"the node's image store holds {', '.join(spec.name for spec in specs)} "
            f"({time.monotonic() - t0:.0f}s)")
    except (BuildError, OSError, RuntimeError, subprocess.SubprocessError) as e:
        log(f"importing the images into the node's image store failed ({e}); the cluster's start imports them")
    finally:
        terminate_group(proc.pid, grace=60)
        proc.wait()
        if node.node_owner().get("containerd") == proc.pid:
            node.NODE_OWNER_FILE.unlink(missing_ok=True)
        shutil.rmtree(state, ignore_errors=True)


def image_records(listing: str) -> dict[str, str]:
    """`ctr images ls` (header first) as {name: target digest}."""
    lines = [line.split() for line in listing.splitlines()[1:] if line.strip()]
    return {words[0]: words[2] for words in lines if len(words) >= 3}


def stale_image_records(listing: str, reference: str) -> list[str]:
    """The image records of containerd (`ctr images ls`, header first) to remove once `reference` is
    imported: the older tags of its image, and every `sha256:<id>` record the CRI plugin added for an
    image no tag is left on (each would keep an older trainer's 11 GB of blobs and unpacked snapshot
    on disk; pods name images by tag only)."""
    digest_of = image_records(listing)
    repository = reference.rsplit(":", 1)[0] + ":"
    current = digest_of.get(reference)
    older_tags = [name for name, digest in digest_of.items()
                  if name.startswith(repository) and name != reference and digest != current]
    tagged = {digest for name, digest in digest_of.items() if not name.startswith("sha256:") and name not in older_tags}
    untagged_ids = [name for name, digest in digest_of.items() if name.startswith("sha256:") and digest not in tagged]
    return older_tags + untagged_ids


def _ctr_output(ctr: list[str], *args: str) -> str:
    return subprocess.run([*ctr, *args], capture_output=True, text=True, check=True).stdout


def _ctr_lines(ctr: list[str], *args: str) -> list[str]:
    return _ctr_output(ctr, *args).split()


def _buildah() -> list[str]:
    root = buildah_dir()
    return ["buildah", "--root", str(root / "root"), "--runroot", str(root / "runroot"),
            "--storage-driver", "overlay"]


def _env() -> dict[str, str]:
    # TMPDIR: buildah's temporary files and its RUN --mount=type=cache folders (pip's cache).
    tmp = buildah_dir() / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmp)}


def _log_file(spec: ImageSpec) -> Path:
    return images_dir() / "logs" / f"{spec.name}-{content_hash(spec)[:12]}.log"


def _build(spec: ImageSpec, reference: str, log: Log) -> None:
    log_file = _log_file(spec)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    work = buildah_dir() / "tmp" / f"build-{spec.name}-{content_hash(spec)[:12]}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    context = work / "context"
    context.mkdir(parents=True)
    try:
        _assemble_context(spec, context, log_file)
        argv = [*_buildah(), "bud", "--layers", "--pull=never", "--network=host", "--force-rm",
                "-f", str(spec.dockerfile), "-t", reference,
                *(f"--build-arg={k}={v}" for k, v in sorted(build_args(spec).items())),
                *_pip_secrets(work / "secrets"), str(context)]
        _run_logged(argv, log_file, _env(), progress=log)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _assemble_context(spec: ImageSpec, context: Path, log_file: Path) -> None:
    """Copy (hard-link where possible) exactly the hashed files; run the host steps."""
    for rel, path in context_files(spec):
        _place(path, context / rel)
    for name, path in spec.extra_context.items():
        _place(Path(path), context / name)
    for step in spec.steps:
        argv = [a.replace("{out}", str(context / step.output)).replace("{context}", str(spec.context))
                for a in step.argv]
        _run_logged(argv, log_file, {**_env(), **dict(step.env)})
        if not (context / step.output).exists():
            raise BuildError(f"{step.argv[0]} did not write {step.output}")


def _place(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_symlink():
        dst.symlink_to(os.readlink(src))
    elif src.is_dir():
        dst.mkdir(exist_ok=True)
        dst.chmod(stat.S_IMODE(src.stat().st_mode))
    else:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)


def _pip_secrets(folder: Path) -> list[str]:
    """`--secret` options that hand the host's pip configuration to the RUN steps that mount them.

    The Dockerfiles mount `pip.conf` at /etc/pip.conf and `pip-ca` at /run/secrets/pip-ca for the
    steps that run pip; buildah (like BuildKit) removes both after each step, so neither reaches a
    layer, and nothing lands in the image's environment. The file is the host's /etc/pip.conf (or
    $PIP_CONFIG_FILE) with the host's PIP_* variables added, `cert` pointing at the mounted CA
    bundle (the host's, which trusts an intercepting proxy), and host-only paths left out.
    """
    folder.mkdir(parents=True, exist_ok=True)
    config = configparser.ConfigParser(interpolation=None)
    for path in (os.environ.get("PIP_CONFIG_FILE"), "/etc/xdg/pip/pip.conf", "/etc/pip.conf"):
        if path and Path(path).is_file():
            config.read(path)
            break
    if not config.has_section("global"):
        config.add_section("global")
    for key, value in os.environ.items():
        if key.startswith("PIP_") and key != "PIP_CONFIG_FILE":
            config["global"][key[4:].lower().replace("_", "-")] = value
    ca = (config["global"].get("cert") or os.environ.get("REQUESTS_CA_BUNDLE")
          or "/etc/ssl/certs/ca-certificates.crt")
    host_only = {"cert", "client-cert", "cache-dir", "no-cache-dir", "log", "target", "prefix", "root",
                 "src", "user", "build", "config-file", "require-virtualenv", "no-index"}
    for section in config.sections():
        for key in list(config[section]):
            value = config[section][key]
            if key in host_only or (key == "find-links" and "://" not in value):
                del config[section][key]
    args = []
    if Path(ca).is_file():
        shutil.copyfile(ca, folder / PIP_CA_SECRET)
        config["global"]["cert"] = f"/run/secrets/{PIP_CA_SECRET}"
        args.append(f"--secret=id={PIP_CA_SECRET},src={folder / PIP_CA_SECRET}")
    with open(folder / PIP_CONF_SECRET, "w") as f:
        config.write(f)
    args.append(f"--secret=id={PIP_CONF_SECRET},src={folder / PIP_CONF_SECRET}")
    return args


def _ensure_in_storage(spec: ImageSpec) -> None:
    """A base image must be in buildah's storage to build FROM it: load it from its archive."""
    reference = ref(spec)
    if _buildah_has(reference):
        return
    image_id = subprocess.run([*_buildah(), "pull", "--quiet", f"oci-archive:{archive_path(spec)}"],
                              capture_output=True, text=True, check=True, env=_env()).stdout.split()[-1]
    subprocess.run([*_buildah(), "tag", image_id, reference], capture_output=True, check=True, env=_env())
    if not _buildah_has(reference):
        raise BuildError(f"{reference} not in buildah's storage after pulling {archive_path(spec)}")


def _buildah_has(reference: str) -> bool:
    return subprocess.run([*_buildah(), "inspect", "--type", "image", reference], capture_output=True,
                          env=_env()).returncode == 0


def _export(reference: str, archive: Path) -> None:
    """Write the image as an OCI archive with uncompressed layers, under a temporary name first.

    buildah 1.28 gzips the layers of `oci` and `oci-archive` pushes even with -D; its docker-archive
    keeps them uncompressed. So buildah streams a docker-archive into a pipe and docker_to_oci
    rewrites it on the fly (the same config and layer blobs; an OCI manifest and index naming
    `reference`): the layers are written once."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    partial = archive.with_name(f".{archive.name}.partial-{os.getpid()}")
    log_file = images_dir() / "logs" / "push.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    error: Exception | None = None
    try:
        with open(log_file, "a") as log:
            argv = [*_buildah(), "push", "--quiet", reference, f"docker-archive:/dev/stdout:{reference}"]
            log.write(f"\n$ {shlex.join(argv)}\n")
            log.flush()
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, env=_env())
            try:
                docker_to_oci(proc.stdout, partial, reference)
            except (tarfile.TarError, BuildError, KeyError, ValueError, OSError) as e:
                error = e
            finally:
                proc.stdout.close()  # a conversion that stopped early ends the push
                returncode = proc.wait()
        if returncode != 0 or error is not None:
            raise BuildError(f"exporting {reference} failed (buildah push exit {returncode}; {error}); see {log_file}")
        os.replace(partial, archive)
    finally:
        partial.unlink(missing_ok=True)


def docker_to_oci(docker_archive: IO[bytes], oci_archive: Path, reference: str) -> None:
    """Rewrite a `docker save` archive (uncompressed layers, read as a stream) as an OCI image
    layout archive with the same config and layer blobs. An uncompressed layer's digest is its
    diff_id, which names it in both layouts (containerd checks every blob against its digest)."""
    written: dict[str, int] = {}
    files: dict[str, bytes] = {}
    with tarfile.open(fileobj=docker_archive, mode="r|", bufsize=_COPY_BUFFER) as src, \
            tarfile.open(oci_archive, "w", format=tarfile.PAX_FORMAT, copybufsize=_COPY_BUFFER) as dst:
        for member in src:
            if not member.isfile():
                continue
            if re.fullmatch(r"[0-9a-f]{64}\.tar", member.name):
                _add_file(dst, f"blobs/sha256/{member.name[:64]}", src.extractfile(member), member.size)
                written[f"sha256:{member.name[:64]}"] = member.size
            elif member.name == "manifest.json" or re.fullmatch(r"[0-9a-f]{64}\.json", member.name):
                files[member.name] = src.extractfile(member).read()
        (entry,) = json.loads(files["manifest.json"])
        config = files[entry["Config"]]
        layers = []
        for diff_id in json.loads(config)["rootfs"]["diff_ids"]:
            if diff_id not in written:
                raise BuildError(f"layer {diff_id} of the config is not in the archive")
            layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": diff_id,
                           "size": written[diff_id]})
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": _add_blob(dst, config),
                       "size": len(config)},
            "layers": layers,
        }, separators=(",", ":")).encode()
        index = {"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": _add_blob(dst, manifest),
            "size": len(manifest), "annotations": {"org.opencontainers.image.ref.name": reference}}]}
        _add_bytes(dst, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        _add_bytes(dst, "index.json", json.dumps(index, separators=(",", ":")).encode())


_COPY_BUFFER = 4 << 20


def _add_blob(dst: tarfile.TarFile, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    _add_bytes(dst, f"blobs/sha256/{digest}", data)
    return "sha256:" + digest


def _add_bytes(dst: tarfile.TarFile, name: str, data: bytes) -> None:
    _add_file(dst, name, io.BytesIO(data), len(data))


def _add_file(dst: tarfile.TarFile, name: str, f, size: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0
    dst.addfile(info, f)


def _prune_buildah(spec: ImageSpec) -> None:
    """Only the newest build of an image stays: in buildah's storage, its older tags go once the new
    one is built (the older archives went before; the trainer is 5 GB a version, and a disk that fills
    up makes the kubelet evict pods and delete images). A checkout on an older tree rebuilds from the
    layer cache in about a minute."""
    current = ref(spec)
    listed = subprocess.run([*_buildah(), "images", "--format", "{{.Name}}:{{.Tag}}"], capture_output=True,
                            text=True, check=False, env=_env()).stdout.split()
    older = [r for r in listed if r.startswith(current.rsplit(":", 1)[0] + ":") and r != current]
    if older:
        subprocess.run([*_buildah(), "rmi", *older], capture_output=True, check=False, env=_env())


def _prune_archives(spec: ImageSpec, keep: Path) -> None:
    for path in images_dir().glob(f"{spec.name}-*.oci.tar"):
        if path != keep:
            path.unlink(missing_ok=True)


# What a build of each image takes on disk at its peak (the RUN step's files, their committed layer
# and the exported archive), from their sizes: the trainer's pip layer and its archive are 5.5 GB each.
BUILD_DISK_GB = {"trainer": 18, "operator": 2, "base": 1}
_DISK_FULL = "no space left on device"


def _explain_full_disk(spec: ImageSpec, error: BuildError) -> BuildError:
    """A build that ran out of disk says so, with what it needs and where, instead of ending in
    buildah's last 40 lines."""
    if _DISK_FULL not in str(error).lower() and _DISK_FULL not in _log_tail(spec).lower():
        return error
    existing = next(d for d in (buildah_dir(), *buildah_dir().parents) if d.exists())
    free_gb = shutil.disk_usage(existing).free / 1e9
    return BuildError(
        f"building {ref(spec)} ran out of disk under {cache_dir()}: {free_gb:.1f} GB free now, the build "
        f"needs about {BUILD_DISK_GB.get(spec.name, 2)} GB at its peak (and the local cluster's node "
        f"about 12 GB more for the unpacked trainer). Free space (an old cache) or set "
        f"FTO_CACHE_DIR to a larger disk; the build log is {_log_file(spec)}.")


def _log_tail(spec: ImageSpec, size: int = 64 * 1024) -> str:
    try:
        with open(_log_file(spec), "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _run_logged(argv: list[str], log_file: Path, env: dict[str, str], progress: Log | None = None) -> None:
    """Run argv with its output appended to log_file; lines starting with STEP go to progress."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a") as out:
        out.write(f"\n$ {shlex.join(argv)}\n")
        out.flush()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, text=True, errors="replace")
        for line in proc.stdout:
            out.write(line)
            if progress and line.startswith("STEP "):
                out.flush()
                progress(f"  {line.rstrip()[:150]}")
        returncode = proc.wait()
    if returncode != 0:
        tail = "".join(log_file.read_text(errors="replace").splitlines(keepends=True)[-40:])
        raise BuildError(f"{shlex.join(argv[:6])}... failed (exit {returncode}); the end of {log_file}:\n{tail}")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---- CLI ----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m e2e.localcluster.images", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["build", "list", "ref"])
    parser.add_argument("names", nargs="*", help=f"images (default: all of {', '.join(IMAGES)})")
    parser.add_argument("--coredns-binary", type=Path, help="build or name the coredns image from this binary")
    args = parser.parse_args(argv)
    specs = dict(IMAGES)
    if args.coredns_binary:
        specs["coredns"] = coredns_spec(args.coredns_binary)
    unknown = [n for n in args.names if n not in specs]
    if unknown:
        parser.error(f"unknown image(s) {', '.join(unknown)}; known: {', '.join(specs)}"
                     + ("" if args.coredns_binary else " (coredns needs --coredns-binary)"))
    chosen = [specs[n] for n in args.names] or list(specs.values())
    if args.command == "ref":
        if len(chosen) != 1 or not args.names:
            parser.error("ref takes one image name")
        print(ref(chosen[0]))
        return 0
    if args.command == "list":
        for spec in chosen:
            archive = archive_path(spec)
            size = f"{archive.stat().st_size / 1e6:.0f} MB" if archive.exists() else "not built"
            print(f"{spec.name:10} {ref(spec):52} {size}")
        return 0
    for spec in chosen:
        t0 = time.monotonic()
        archive = ensure_built(spec)
        print(f"{ref(spec)}  {archive}  ({time.monotonic() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
