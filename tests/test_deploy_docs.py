"""docs/deploy.md works as written where it can without a cluster, and the deployment
fits the server: the guide's offline commands run (``cp``, ``kubectl kustomize``,
``ssh-keygen``, the host-key Secret as a client-side dry run), the commands that need a
cluster name objects that exist, and the Deployment's arguments, mounts and the
documented Secret give a configuration that ``check-config`` accepts."""

from __future__ import annotations

import base64
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploykit import (
    BASE,
    GATEWAY_NS,
    GUEST_NS,
    OVERLAY,
    ROOT,
    Obj,
    configmap,
    find,
    kubectl,
    one,
    render,
)

from kuberun_trio.cli import build_parser
from kuberun_trio.gateway.podtemplate import LABEL_INSTANCE
from kuberun_trio.server.settings import load_settings

pytestmark = pytest.mark.skipif(kubectl() is None, reason="kubectl is not installed")

GUIDE = "docs/deploy.md"
KINDS = {"deployment": "Deployment", "service": "Service", "secret": "Secret"}


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


def test_guide_offline_commands_run(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "deploy", tmp_path / "deploy")
    ran = 0
    for line in commands():
        words = shlex.split(line)
        if words[0] == "cp" or words[:2] == ["kubectl", "kustomize"]:
            result = run(words, tmp_path)
            assert result.returncode == 0, f"{line}: {result.stderr}"
            ran += 1
        elif words[0] == "kubectl" and ("-k" in words):  # apply -k / delete -k: a cluster
            tree = words[words.index("-k") + 1]
            result = run(["kubectl", "kustomize", tree], tmp_path)
            assert result.returncode == 0, f"{line}: {result.stderr}"
    assert ran >= 2
    secret = documented_secret(tmp_path)
    assert (secret["metadata"]["namespace"], secret["metadata"]["name"]) == (
        GATEWAY_NS, "kuberun-trio-host-keys")
    assert (tmp_path / "ssh_host_ed25519_key.pub").exists()  # the known_hosts step reads it


def test_guide_commands_name_objects_that_exist() -> None:
    objects = render(OVERLAY)
    checked = 0
    invocations = [(line, call) for line in commands()
                   for call in re.findall(r"kubectl [^)|;]*", line)]  # also inside $(...)
    for line, call in invocations:
        words = shlex.split(call)
        if "-n" not in words:
            continue
        namespace = words[words.index("-n") + 1]
        assert namespace in (GATEWAY_NS, GUEST_NS), line
        for i, word in enumerate(words):
            kind, _, name = word.partition("/")
            if kind in KINDS and name:
                pass
            elif word in KINDS and i + 1 < len(words) and not words[i + 1].startswith("-") \
                    and words[i - 1] == "get":
                kind, name = word, words[i + 1]
            else:
                continue
            if KINDS[kind] != "Secret":
                assert find(objects, KINDS[kind], name, namespace), line
                checked += 1
        for flag in ("-l", "-L"):  # label selectors and columns: the pods' instance label
            if flag in words:
                assert words[words.index(flag) + 1].split("=")[0] == LABEL_INSTANCE, line
                checked += 1
    assert checked >= 6


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


@pytest.mark.parametrize("tree", [BASE, OVERLAY])
def test_deployment_args_and_mounts_give_a_valid_configuration(tmp_path: Path,
                                                               tree: str) -> None:
    objects = render(tree)
    secret = documented_secret(tmp_path)
    container, places = mount(objects, secret, tmp_path / "root")
    args = relocate(container["args"], places)
    config_file = Path(args[args.index("--config") + 1])
    config_file.write_text(yaml.safe_dump(relocate(yaml.safe_load(config_file.read_text()),
                                                   places)))
    result = subprocess.run([sys.executable, "-m", "kuberun_trio", "check-config",
                             str(config_file)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "listen 0.0.0.0:2222" in result.stdout and "via inCluster" in result.stdout
    # The same arguments, through the server's own parser and settings, in a pod.
    parsed = build_parser().parse_args(args)
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "POD_NAME": "kuberun-trio-abc12",
           "POD_NAMESPACE": GATEWAY_NS, "POD_UID": "0b3d", "HOME": str(tmp_path)}
    settings = load_settings(parsed, environ=env)
    assert settings.cluster == "config" and not settings.demo
    assert settings.config.kubernetes.connection.in_cluster
    assert settings.config.kubernetes.pod.metadata["namespace"] == GUEST_NS
    assert "ownerReferences" not in settings.config.kubernetes.pod.metadata  # cross-namespace
    assert parsed.grace is not None and parsed.command is None
    keys = configmap(objects, "kuberun-trio-authorized-keys")["data"]["authorized_keys"]
    assert all(line.startswith("#") for line in keys.splitlines() if line.strip()), \
        "the shipped manifests let nobody in until a site adds keys"


def test_readme_rbac_matches_the_manifests() -> None:
    text = (ROOT / "README.md").read_text()
    (block,) = [b for b in re.findall(r"^```yaml\n(.*?)^```", text, re.S | re.M)
                if "kind: Role" in b]
    readme = [d for d in yaml.safe_load_all(block) if d]
    manifests = render(BASE)
    for doc in readme:
        (twin,) = find(manifests, doc["kind"], doc["metadata"]["name"],
                       doc["metadata"]["namespace"])
        for key in ("rules", "subjects", "roleRef"):
            assert doc.get(key) == twin.get(key), (doc["kind"], key)
    assert {d["kind"] for d in readme} == {"Role", "RoleBinding"}
    assert len(readme) == len(find(manifests, "Role")) + len(find(manifests, "RoleBinding"))


def test_guide_is_linked_from_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Pointing it at a real cluster", 1)[1].split("\n## ", 1)[0]
    assert "(docs/deploy.md)" in section
    assert os.path.exists(ROOT / "docs/deploy.md")
