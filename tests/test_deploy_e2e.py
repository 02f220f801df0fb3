"""The deployment's gateway, run for real: the Deployment's arguments and mounts, the
ConfigMap's configuration and the host-key Secret made as docs/deploy.md says, with only
the cluster swapped (the embedded cluster through a kubeconfig instead of the pod's
service account) and the listen address moved to a free loopback port. The real ``ssh``
client gets a shell in a guest pod in ``ssh-sessions`` and sees the Secret's host key;
SIGTERM ends the gateway within the Deployment's termination grace period, pods gone."""

from __future__ import annotations

import base64
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import trio
import yaml
from deploykit import (
    BASE,
    GATEWAY_NS,
    GUEST_NS,
    documented_secret,
    kubectl,
    mounted_gateway,
    one,
    render,
)

from kuberun_trio.cluster import EmbeddedCluster
from kuberun_trio.server.keys import known_hosts_line, load_private_key

pytestmark = [
    pytest.mark.skipif(kubectl() is None, reason="kubectl is not installed"),
    pytest.mark.skipif(not Path("/usr/bin/ssh").exists(), reason="needs openssh-client"),
]


def authorize(tmp_path: Path, keys_dir: Path) -> None:
    """The site's step: a user's key into authorized_keys (the shipped file has none)."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                    str(tmp_path / "alice")], check=True)
    with (keys_dir / "authorized_keys").open("a") as f:
        f.write((tmp_path / "alice.pub").read_text())


def loopback_endpoints(config_file: Path) -> None:
    """The probes' endpoints move to free loopback ports (other tests run beside this one)."""
    config = yaml.safe_load(config_file.read_text())
    assert (config["health"]["enable"], config["metrics"]["enable"]) == (True, True)
    config["health"]["listen"] = config["metrics"]["listen"] = "127.0.0.1:0"
    config_file.write_text(yaml.safe_dump(config))


def probe(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return int(answer.status), bytes(answer.read())


async def test_the_deployed_configuration_serves_ssh(tmp_path: Path,
                                                     cluster: EmbeddedCluster) -> None:
    objects = render(BASE)
    secret = documented_secret(tmp_path)
    args, places = mounted_gateway(objects, secret, tmp_path / "root")
    loopback_endpoints(Path(args[args.index("--config") + 1]))
    authorize(tmp_path, Path(places["/etc/kuberun-trio/authorized-keys"]))
    # The rendered Namespace, sent as JSON (the embedded cluster serves no openapi for
    # kubectl's validation, and `kubectl create namespace` 1.33 sends protobuf).
    namespace = one(objects, "Namespace", GUEST_NS)
    await trio.run_process([str(kubectl()), "--kubeconfig", str(cluster.kubeconfig_path),
                            "create", "--validate=false", "-f", "-"],
                           stdin=yaml.safe_dump(namespace).encode(), capture_stdout=True)
    host_key = load_private_key(base64.b64decode(secret["data"]["ssh_host_ed25519_key"]))
    env = {"PATH": "/usr/bin:/bin", "XDG_STATE_HOME": places["/var/lib/kuberun-trio"],
           "HOME": str(tmp_path), "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    log = tmp_path / "gateway.log"
    with log.open("wb") as err:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "kuberun_trio", *args, "--kubeconfig",
             str(cluster.kubeconfig_path), "--listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE, stderr=err, env=env)
    try:
        assert proc.stdout is not None
        out = b""
        with trio.fail_after(60):
            while b"connect with" not in out:
                chunk = await proc.stdout.receive_some(4096)
                assert chunk, log.read_text()
                out += chunk
        port = int(out.split(b"listening on 127.0.0.1:", 1)[1].split()[0])
        # what the Deployment's readiness probe asks
        ready_url = out.split(b"health at ", 1)[1].split()[0].decode()
        assert await trio.to_thread.run_sync(probe, ready_url) == (200, b"ok")
        (tmp_path / "known_hosts").write_text(known_hosts_line("127.0.0.1", port, host_key))
        with trio.fail_after(60):
            result = await trio.run_process(
                ["ssh", "-F", "/dev/null", "-i", str(tmp_path / "alice"), "-p", str(port),
                 "-o", f"UserKnownHostsFile={tmp_path / 'known_hosts'}",
                 "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
                 "-o", "IdentitiesOnly=yes", "alice@127.0.0.1", "echo $HOSTNAME; hostname"],
                capture_stdout=True, capture_stderr=True, check=False)
        assert result.returncode == 0, (result.stderr, log.read_text())
        assert result.stdout.decode().split()[-1].startswith("kuberun-")
        assert b'"event"' in log.read_bytes()  # log.format json
        grace = one(objects, "Deployment", "kuberun-trio", GATEWAY_NS)[
            "spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        proc.terminate()
        started = time.monotonic()
        with trio.fail_after(grace):
            assert await proc.wait() == 0, log.read_text()
        assert time.monotonic() - started < grace
        assert cluster.pods(GUEST_NS) == []
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
