"""The Dockerfile, checked without a container engine: its essentials (official slim base
pinned by tag, non-root numeric USER matching the Deployment, the entrypoint, the ports),
that what it COPYs exists and is not excluded by .dockerignore, and that the build
stage's ``pip install .`` works from exactly those files (built here as a wheel, offline)."""

from __future__ import annotations

import fnmatch
import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from deploykit import BASE, GATEWAY_NS, ROOT, Instruction, dockerfile, kubectl, one, render

from kuberun_trio.server.demo import default_state_dir

IMAGE = re.compile(r"python:(?P<version>3\.\d+\.\d+)-slim(-[a-z]+)?")


def stage_names(instructions: list[Instruction]) -> list[str]:
    names = []
    for i in instructions:
        if i.keyword == "FROM":
            words = i.args.split()
            names.append(words[2].lower() if len(words) == 3 and words[1].upper() == "AS" else "")
    return names


def final(instructions: list[Instruction], keyword: str) -> list[Instruction]:
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last and i.keyword == keyword]


def copies(instructions: list[Instruction]) -> list[tuple[list[str], list[str], str]]:
    """(flags, sources, destination) of every COPY/ADD."""
    out = []
    for i in instructions:
        if i.keyword in ("COPY", "ADD"):
            words = shlex.split(i.args)
            flags = [w for w in words if w.startswith("--")]
            rest = [w for w in words if not w.startswith("--")]
            out.append((flags, rest[:-1], rest[-1]))
    return out


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore excludes ``path`` or a folder above it (no ``!`` rules used)."""
    parts = Path(path).parts
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    for pattern in patterns:
        if pattern.startswith("**/"):  # at any depth
            if any(fnmatch.fnmatch(part, pattern[3:]) for part in parts):
                return True
        elif any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes):
            return True
    return False


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert not any(p.startswith("!") for p in patterns), "ignored() does not handle ! rules"
    return patterns


def env(instructions: list[Instruction]) -> dict[str, str]:
    """The final stage's ENV values (``KEY=VALUE`` form)."""
    values: dict[str, str] = {}
    for i in final(instructions, "ENV"):
        for word in shlex.split(i.args):
            key, _, value = word.partition("=")
            values[key] = value
    return values


def test_multi_stage_on_a_pinned_official_slim_python() -> None:
    instructions = dockerfile()
    names = stage_names(instructions)
    assert len(names) >= 2, "multi-stage"
    assert "ARG" not in {i.keyword for i in instructions if i.stage < 0}, "FROM must be literal"
    for i in instructions:
        if i.keyword == "FROM":
            image = i.args.split()[0]
            assert "latest" not in image
            assert image.lower() in names or IMAGE.fullmatch(image), image
    for i in instructions:
        if i.keyword != "FROM":
            assert ":latest" not in i.args


def test_runs_as_the_numeric_non_root_user_the_deployment_expects() -> None:
    (user,) = final(dockerfile(), "USER")
    uid, _, gid = user.args.partition(":")
    assert uid.isdigit() and gid.isdigit() and int(uid) != 0 and int(gid) != 0
    if kubectl() is None:
        pytest.skip("kubectl is not installed")
    pod = one(render(BASE), "Deployment", "kuberun-trio", GATEWAY_NS)["spec"]["template"]["spec"]
    context = pod["securityContext"]
    assert (context["runAsUser"], context["runAsGroup"], context["fsGroup"]) == (
        int(uid), int(gid), int(gid))


def test_entrypoint_and_ports() -> None:
    instructions = dockerfile()
    (entrypoint,) = final(instructions, "ENTRYPOINT")
    assert entrypoint.json_args() == ["python", "-m", "kuberun_trio"]
    ports = {p for i in final(instructions, "EXPOSE") for p in i.args.split()}
    assert ports == {"2222", "9100", "7000"}
    # `python` is the virtualenv's: its bin comes first on PATH, and it is the one built.
    path = env(instructions)["PATH"].split(":")
    venv = path[0].removesuffix("/bin")
    assert any(i.keyword == "RUN" and f"python -m venv {venv}" in i.args for i in instructions)
    assert any(flags == ["--from=build"] and sources == [venv]
               for flags, sources, _ in copies(instructions))


def test_state_dir_is_the_deployments_writable_mount() -> None:
    """The server's default state dir in the image is the emptyDir the Deployment mounts
    (the root filesystem is read-only there)."""
    state = default_state_dir(env(dockerfile()))
    if kubectl() is None:
        pytest.skip("kubectl is not installed")
    (container,) = one(render(BASE), "Deployment")["spec"]["template"]["spec"]["containers"]
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert str(state) in writable


def test_copied_files_exist_and_are_not_ignored() -> None:
    patterns = dockerignore()
    local = [(sources, dest) for flags, sources, dest in copies(dockerfile())
             if not any(f.startswith("--from") for f in flags)]
    assert local
    for sources, _ in local:
        for source in sources:
            assert (ROOT / source).exists(), source
            assert not ignored(source, patterns), f"{source} is excluded by .dockerignore"
    # the matcher works: these are excluded
    assert ignored("tests/test_x.py", patterns) and ignored(".git/HEAD", patterns)
    assert ignored("kuberun_trio/__pycache__/x.pyc", patterns)


def test_build_stage_installs_from_exactly_the_copied_files(tmp_path: Path) -> None:
    """``pip install .`` of the build stage, as a wheel built from a context holding only
    what the Dockerfile copies (no network: --no-index, no build isolation)."""
    context = tmp_path / "src"
    patterns = dockerignore()
    for flags, sources, _ in copies(dockerfile()):
        if any(f.startswith("--from") for f in flags):
            continue
        for source in sources:
            for path in [ROOT / source, *(ROOT / source).rglob("*")]:
                rel = path.relative_to(ROOT)
                if path.is_file() and not ignored(str(rel), patterns):
                    (context / rel).parent.mkdir(parents=True, exist_ok=True)
                    (context / rel).write_bytes(path.read_bytes())
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index",
         "--no-build-isolation", "--disable-pip-version-check", "-w", str(tmp_path / "dist"),
         str(context)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "dist").glob("kuberun_trio-*.whl")
    packaged = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("kuberun_trio/")}
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "kuberun_trio").rglob("*.py")}
    assert sources == packaged
