"""Helpers for the deployment tests: render the kustomize trees, find objects, read the
Dockerfile (importable as ``deploykit``).

Rendering uses the real ``kubectl kustomize`` (no cluster needed); the rendered objects
are plain dicts as ``yaml.safe_load_all`` gives them.
"""

from __future__ import annotations

import base64
import functools
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import attrs
import yaml
from support import kubectl_versions

ROOT = Path(__file__).resolve().parent.parent
BASE = "deploy/base"
OVERLAY = "deploy/overlays/example"
TREES = (BASE, OVERLAY)
GATEWAY_NS, GUEST_NS = "ssh-gateway", "ssh-sessions"
GUIDE = "docs/deploy.md"

Obj = dict[str, Any]


def kubectl() -> str | None:
    """A kubectl binary: the newest versioned one the tests use, else plain ``kubectl``."""
    return next(iter(kubectl_versions()), None) or shutil.which("kubectl")


@functools.cache
def render(tree: str) -> tuple[Obj, ...]:
    """``kubectl kustomize <tree>`` (relative to the repository), parsed."""
    binary = kubectl()
    assert binary is not None, "kubectl is not installed"
    result = subprocess.run([binary, "kustomize", tree], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


def find(objects: tuple[Obj, ...] | list[Obj], kind: str, name: str | None = None,
         namespace: str | None = None) -> list[Obj]:
    """The objects of ``kind`` (and ``name``, ``namespace`` prefix-free, if given)."""
    return [o for o in objects if o["kind"] == kind
            and (name is None or o["metadata"]["name"] == name)
            and (namespace is None or o["metadata"].get("namespace") == namespace)]


def one(objects: tuple[Obj, ...] | list[Obj], kind: str, name: str | None = None,
        namespace: str | None = None) -> Obj:
    found = find(objects, kind, name, namespace)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def configmap(objects: tuple[Obj, ...], prefix: str) -> Obj:
    """The ConfigMap whose (hash-suffixed) name starts with ``prefix``."""
    (found,) = [o for o in find(objects, "ConfigMap") if o["metadata"]["name"].startswith(prefix)]
    return found


def gateway_config(objects: tuple[Obj, ...]) -> dict[str, Any]:
    """The gateway's configuration file, as YAML loaded from the rendered ConfigMap."""
    data: dict[str, Any] = yaml.safe_load(
        configmap(objects, "kuberun-trio-config")["data"]["config.yaml"])
    return data


# == the deployment guide and the pod's mounts ===============================================

def commands(doc: str = GUIDE) -> list[str]:
    """The lines of the ``sh`` blocks of ``doc``."""
    text = (ROOT / doc).read_text()
    blocks = re.findall(r"^```sh\n(.*?)^```", text, re.S | re.M)
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def run(words: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    binary = kubectl()
    assert binary is not None
    argv = [binary, *words[1:]] if words[0] == "kubectl" else words
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60)


def documented_secret(tmp_path: Path) -> Obj:
    """The host-key Secret exactly as the guide creates it (``--dry-run=client``)."""
    lines = commands()
    (keygen,) = [c for c in lines if c.startswith("ssh-keygen")]
    (create,) = [c for c in lines if " create secret " in c]
    assert run(shlex.split(keygen), tmp_path).returncode == 0
    result = run([*shlex.split(create), "--dry-run=client", "-o", "yaml"], tmp_path)
    assert result.returncode == 0, result.stderr
    secret: Obj = yaml.safe_load(result.stdout)
    return secret


def mount(objects: tuple[Obj, ...], secret: Obj, root: Path) -> tuple[Obj, dict[str, str]]:
    """Lay out the gateway container's volume mounts below ``root`` as the kubelet would
    (ConfigMaps from the rendered objects, the Secret given); returns the container and
    the mapping of mount paths to their place below ``root``."""
    deployment = one(objects, "Deployment", "kuberun-trio", GATEWAY_NS)
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    places = {}
    for m in container["volumeMounts"]:
        volume, target = volumes[m["name"]], root / m["mountPath"].lstrip("/")
        places[m["mountPath"]] = str(target)
        data: dict[str, bytes] = {}
        if "configMap" in volume:
            (cm,) = [o for o in find(objects, "ConfigMap", namespace=GATEWAY_NS)
                     if o["metadata"]["name"] == volume["configMap"]["name"]]
            data = {k: v.encode() for k, v in cm["data"].items()}
        elif "secret" in volume:
            assert volume["secret"]["secretName"] == secret["metadata"]["name"]
            data = {k: base64.b64decode(v) for k, v in secret["data"].items()}
        else:
            assert "emptyDir" in volume, volume
        if "subPath" in m:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data[m["subPath"]])
        else:
            target.mkdir(parents=True, exist_ok=True)
            for key, value in data.items():
                (target / key).write_bytes(value)
    return container, places


def relocate(value: Any, places: dict[str, str]) -> Any:
    """``value`` with every string that starts with a mount path moved below the root."""
    if isinstance(value, dict):
        return {k: relocate(v, places) for k, v in value.items()}
    if isinstance(value, list):
        return [relocate(v, places) for v in value]
    if isinstance(value, str):
        for path, place in places.items():
            if value == path or value.startswith(path + "/"):
                return place + value[len(path):]
    return value



def mounted_gateway(objects: tuple[Obj, ...], secret: Obj,
                    root: Path) -> tuple[list[str], dict[str, str]]:
    """The gateway's arguments and mounts laid out below ``root`` (:func:`mount`), its
    configuration file's paths moved along; returns (arguments, mount places)."""
    container, places = mount(objects, secret, root)
    args: list[str] = relocate(container["args"], places)
    config_file = Path(args[args.index("--config") + 1])
    config = relocate(yaml.safe_load(config_file.read_text()), places)
    config_file.write_text(yaml.safe_dump(config))
    return args, places

# == the Dockerfile ============================================================================


@attrs.frozen
class Instruction:
    keyword: str
    """Upper case: ``FROM``, ``COPY``, ..."""
    args: str
    """The rest of the (joined) line."""
    stage: int
    """Index of the build stage it belongs to (the FROM that opened it)."""

    def json_args(self) -> list[str]:
        """The exec form (``["python", "-m", ...]``)."""
        value = json.loads(self.args)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self.args
        return value


def dockerfile(path: Path = ROOT / "Dockerfile") -> list[Instruction]:
    """The instructions of a Dockerfile: comments dropped, ``\\`` continuations joined."""
    instructions: list[Instruction] = []
    stage, pending = -1, ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comment lines inside a continued instruction are dropped
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, args.strip(), stage))
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions
