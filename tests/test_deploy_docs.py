"""docs/deploy.md works as written where it can without a cluster, and the deployment
fits the server: the guide's offline commands run (``cp``, ``kubectl kustomize``,
``ssh-keygen``, the host-key Secret as a client-side dry run), the commands that need a
cluster name objects that exist, and the Deployment's arguments, mounts and the
documented Secret give a configuration that ``check-config`` accepts."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from deploykit import (
    BASE,
    GATEWAY_NS,
    GUEST_NS,
    GUIDE,
    OVERLAY,
    ROOT,
    commands,
    configmap,
    documented_secret,
    find,
    gateway_config,
    kubectl,
    mounted_gateway,
    one,
    render,
    run,
)

from kuberun_trio.cli import build_parser
from kuberun_trio.core.podtemplate import LABEL_INSTANCE
from kuberun_trio.server.settings import load_settings

pytestmark = pytest.mark.skipif(kubectl() is None, reason="kubectl is not installed")

KINDS = {"deployment": "Deployment", "service": "Service", "secret": "Secret"}


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


@pytest.mark.parametrize("tree", [BASE, OVERLAY])
def test_deployment_args_and_mounts_give_a_valid_configuration(tmp_path: Path,
                                                               tree: str) -> None:
    objects = render(tree)
    secret = documented_secret(tmp_path)
    args, _ = mounted_gateway(objects, secret, tmp_path / "root")
    config_file = args[args.index("--config") + 1]
    # As in the pod: the service host is set; outside a real pod the service account token
    # is all check-config may miss (it checks the in-cluster environment too).
    pod_env = {**os.environ, "KUBERNETES_SERVICE_HOST": "10.96.0.1",
               "KUBERNETES_SERVICE_PORT": "443"}
    result = subprocess.run([sys.executable, "-m", "kuberun_trio", "check-config",
                             str(config_file)], capture_output=True, text=True, timeout=60,
                            env=pod_env)
    problems = result.stderr.splitlines()[1:]
    token = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    if os.path.exists(token):
        assert result.returncode == 0, result.stderr
        assert "listen 0.0.0.0:2222" in result.stdout and "via inCluster" in result.stdout
    else:
        assert result.returncode == 2, result.stderr
        assert [p.split(":")[0].strip() for p in problems] == [
            "kubernetes.connection.inCluster"], result.stderr
        assert f"file not found: {token}" in result.stderr
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


def test_guide_config_override_replaces_the_config(tmp_path: Path) -> None:
    """The guide's ``configMapGenerator`` entry, added to a copy of the example overlay
    with an edited config.yaml, replaces the gateway's configuration."""
    text = (ROOT / GUIDE).read_text()
    (block,) = [b for b in re.findall(r"^```yaml\n(.*?)^```", text, re.S | re.M)
                if "configMapGenerator" in b]
    site = tmp_path / "deploy/overlays/mysite"
    shutil.copytree(ROOT / "deploy", tmp_path / "deploy")
    shutil.copytree(tmp_path / OVERLAY, site)
    config = (ROOT / BASE / "config.yaml").read_text()
    (site / "config.yaml").write_text(config.replace("busybox:1.37", "myteam/shell:1"))
    kustomization = yaml.safe_load((site / "kustomization.yaml").read_text())
    kustomization["configMapGenerator"] += yaml.safe_load(block)["configMapGenerator"]
    (site / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    result = run(["kubectl", "kustomize", "deploy/overlays/mysite"], tmp_path)
    assert result.returncode == 0, result.stderr
    objects = tuple(d for d in yaml.safe_load_all(result.stdout) if d)
    (console,) = gateway_config(objects)["kubernetes"]["pod"]["spec"]["containers"]
    assert console["image"] == "myteam/shell:1"
    volumes = one(objects, "Deployment")["spec"]["template"]["spec"]["volumes"]
    (volume,) = [v for v in volumes if v["name"] == "config"]
    assert volume["configMap"]["name"] == configmap(objects, "kuberun-trio-config")[
        "metadata"]["name"]
