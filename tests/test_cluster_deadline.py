"""The embedded cluster honours ``spec.activeDeadlineSeconds`` as the kubelet does, checked
with the real kubectl: phase Failed, reason DeadlineExceeded, the containers killed, a
Warning event -- and a pod without a deadline keeps running."""

from __future__ import annotations

import json

import pytest
import trio
from support import kubectl_versions
from test_kubectl_conformance import kc

from kuberun_trio.cluster import EmbeddedCluster

pytestmark = pytest.mark.skipif(not kubectl_versions(), reason="kubectl is not installed")


@pytest.fixture(params=kubectl_versions() or ["kubectl"], ids=lambda p: p.rsplit("/", 1)[-1])
def kubectl(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _pod(name: str, deadline: int | None) -> bytes:
    spec: dict[str, object] = {
        "restartPolicy": "Never", "terminationGracePeriodSeconds": 1,
        "containers": [{"name": "c", "image": "busybox",
                        "command": ["sh", "-c", "sleep 1000 & wait"]}]}
    if deadline is not None:
        spec["activeDeadlineSeconds"] = deadline
    return json.dumps({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
                       "spec": spec}).encode()


async def test_active_deadline_fails_the_pod(cluster: EmbeddedCluster, kubectl: str) -> None:
    await kc(cluster, kubectl, "create", "--validate=false", "-f", "-", stdin=_pod("dl", 2))
    await kc(cluster, kubectl, "create", "--validate=false", "-f", "-", stdin=_pod("nodl", None))
    await kc(cluster, kubectl, "wait", "--for=condition=Ready", "pod/dl", "pod/nodl",
             "--timeout=30s")
    started = trio.current_time()
    await kc(cluster, kubectl, "wait", "--for=jsonpath={.status.phase}=Failed", "pod/dl",
             "--timeout=30s")
    assert trio.current_time() - started < 10
    with trio.fail_after(20):
        while True:  # the container is killed (SIGTERM, SIGKILL after the grace)
            pod = json.loads((await kc(cluster, kubectl, "get", "pod", "dl", "-o",
                                       "json")).stdout)
            state = pod["status"]["containerStatuses"][0]["state"]
            if "terminated" in state:
                break
            await trio.sleep(0.2)
    status = pod["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "DeadlineExceeded")
    assert status["message"] == "Pod was active on the node longer than the specified deadline"
    listed = (await kc(cluster, kubectl, "get", "pods", "--no-headers")).stdout.decode()
    rows = {line.split()[0]: line.split()[2] for line in listed.splitlines()}
    assert rows["nodl"] == "Running", listed  # no deadline: untouched
    events = (await kc(cluster, kubectl, "get", "events", "--field-selector",
                       "involvedObject.name=dl", "-o", "json")).stdout
    reasons = {(e["type"], e["reason"]) for e in json.loads(events)["items"]}
    assert ("Warning", "DeadlineExceeded") in reasons, reasons
    await kc(cluster, kubectl, "delete", "pod", "dl", "nodl", "--wait=true", "--timeout=30s")
