"""ConnectionHandler against the embedded cluster: start, failure, delete, and their bounds.

The request log of the cluster is the witness: a failing pod is deleted *before* the
PodStartError reaches the caller, a DELETE that fails or hangs is bounded by
``timeouts.podStop``, and a create interrupted before its response arrives is cleaned up
by the connection-id label.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
from lifecyclekit import StallProxy, settle

from kuberun_trio.aio.bridge import open_aio_loop
from kuberun_trio.aio.kube import RetryPolicy, open_kube_client
from kuberun_trio.cluster import EmbeddedCluster
from kuberun_trio.core.auth import AuthResult
from kuberun_trio.core.config import KubernetesConfig, parse_config
from kuberun_trio.core.podtemplate import LABEL_CONNECTION_ID
from kuberun_trio.errors import KuberunError, PodStartError
from kuberun_trio.gateway.pod import ConnectionHandler

LOGGER = "kuberun_trio.test.handler"
FAST = RetryPolicy(attempts=3, base_delay=0.05, max_delay=0.1)


def config_for(url_or_kubeconfig: str, **sections: Any) -> KubernetesConfig:
    conn = ({"host": url_or_kubeconfig} if url_or_kubeconfig.startswith("http")
            else {"kubeconfig": url_or_kubeconfig})
    data: dict[str, Any] = {"connection": conn,
                            "timeouts": {"podStart": "15s", "podStop": "5s"}}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return parse_config(data)


@pytest.fixture
async def aio_loop() -> AsyncIterator[None]:
    async with open_aio_loop():
        yield


def handler(config: KubernetesConfig, kube: Any, cid: str = "c0ffee") -> ConnectionHandler:
    return ConnectionHandler(config, cid, "192.0.2.7:5555", logging.getLogger(LOGGER),
                             kube=kube, instance="gw-test")


def events(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [getattr(r, "event", "") for r in caplog.records if r.name == LOGGER]


def deletes(cluster: EmbeddedCluster) -> list[Any]:
    return [e for e in cluster.request_log.entries if e.kind == "http" and e.method == "DELETE"]


async def test_connected_creates_waits_and_deletes(
        cluster: EmbeddedCluster, aio_loop: None, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    config = config_for(str(cluster.kubeconfig_path))
    async with open_kube_client(config) as kube:
        async with handler(config, kube).connected("alice", AuthResult()) as pod:
            stored = cluster.store.get_pod(pod.namespace, pod.name)
            assert stored["status"]["phase"] == "Running"
            assert pod.container == "shell"
            labels = stored["metadata"]["labels"]
            assert labels[LABEL_CONNECTION_ID] == "c0ffee"
            assert labels["kuberun.trio/instance"] == "gw-test"
            assert stored["metadata"]["annotations"]["kuberun.trio/client-address"] \
                == "192.0.2.7:5555"
            assert not deletes(cluster)
        assert [e.pod for e in deletes(cluster)] == [pod.name]
    await settle(lambda: not cluster.pods())
    assert events(caplog) == ["pod-created", "pod-running", "pod-deleted"]
    durations = [r for r in caplog.records if getattr(r, "event", "") == "pod-running"]
    assert isinstance(durations[0].duration_ms, int)


async def test_unstructured_form_in_different_tasks(
        cluster: EmbeddedCluster, aio_loop: None) -> None:
    config = config_for(str(cluster.kubeconfig_path))
    async with open_kube_client(config) as kube:
        h = handler(config, kube)
        async with trio.open_nursery() as nursery:
            got: list[Any] = []

            async def start() -> None:
                got.append(await h.on_handshake_success("bob"))

            nursery.start_soon(start)
        assert cluster.store.get_pod("default", got[0].name)["status"]["phase"] == "Running"
        with pytest.raises(KuberunError, match="twice"):
            await h.on_handshake_success("bob")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(h.on_disconnect)
        await h.on_disconnect()  # idempotent
        assert [e.pod for e in deletes(cluster)] == [got[0].name]


@pytest.mark.parametrize(("pod", "reason", "detail"), [
    ({"spec": {"containers": [{"name": "shell", "image": "nosuch/image:1"}]}},
     "ErrImagePull", 'failed to pull and unpack image "nosuch/image:1"'),
    ({"idleCommand": ["/nonexistent/idle"],
      "spec": {"restartPolicy": "Always",
               "containers": [{"name": "shell", "image": "busybox"}]}},
     "CrashLoopBackOff", "back-off"),
    ({"idleCommand": ["/nonexistent/idle"]},
     "Failed", "StartError"),
    ({"spec": {"containers": [{"name": "shell", "image": "slow/image"}]}},
     "Timeout", "not Running and Ready within 1s"),
])
async def test_failed_start_deletes_before_raising(
        cluster: EmbeddedCluster, aio_loop: None, caplog: pytest.LogCaptureFixture,
        pod: dict[str, Any], reason: str, detail: str) -> None:
    caplog.set_level(logging.INFO)
    cluster.faults.fail_image("nosuch/*")
    cluster.faults.delay_start(30, "slow/*")
    config = config_for(str(cluster.kubeconfig_path), pod=pod,
                        timeouts={"podStart": "1s" if reason == "Timeout" else "10s"})
    async with open_kube_client(config) as kube:
        with pytest.raises(PodStartError) as info:
            async with handler(config, kube).connected("alice"):
                pytest.fail("the pod must not start")
        # the DELETE was received (and answered) before the error reached us
        assert [e.pod for e in deletes(cluster)] == [info.value.pod]
        assert info.value.reason == reason
        assert detail in info.value.message
    await settle(lambda: not cluster.pods())
    assert events(caplog)[-1] == "pod-deleted"


async def test_delete_failing_is_bounded_and_logged(
        cluster: EmbeddedCluster, aio_loop: None, caplog: pytest.LogCaptureFixture) -> None:
    config = config_for(str(cluster.kubeconfig_path), timeouts={"podStop": "2s"})
    async with open_kube_client(config, rest_retry=FAST) as kube:
        h = handler(config, kube)
        with trio.fail_after(30):  # a hang would be a missing bound; no timing asserted
            async with h.connected("alice") as pod:
                cluster.faults.fail_requests("delete", "pods", 1000)
    assert len(deletes(cluster)) == 3  # every try failed with 500
    failed = [r for r in caplog.records if getattr(r, "event", "") == "pod-delete-failed"]
    assert failed and failed[0].levelno == logging.ERROR
    assert failed[0].pod == pod.name and "injected fault" in failed[0].getMessage()
    assert failed[0].reason != "Timeout"  # the retries gave up, not the podStop deadline
    assert cluster.pods()  # nobody deleted it: the leftover orphan clean-up is for


async def test_delete_hanging_is_bounded_by_pod_stop(
        http_cluster: EmbeddedCluster, aio_loop: None,
        caplog: pytest.LogCaptureFixture) -> None:
    proxy = StallProxy(("127.0.0.1", int(http_cluster.url.rsplit(":", 1)[1])))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(proxy.serve)
        config = config_for(f"http://127.0.0.1:{port}", timeouts={"podStop": "1.5s"})
        async with open_kube_client(config) as kube:
            rule = proxy.stall(b"DELETE /api/v1/namespaces/default/pods/")
            # The DELETE never gets an answer: only the podStop deadline ends the teardown.
            # fail_after is the hang guard; the log line says which bound fired.
            with trio.fail_after(30):
                async with handler(config, kube).connected("alice"):
                    pass
            assert rule.hits == 1 and not deletes(http_cluster)
            failed = [r for r in caplog.records if getattr(r, "event", "") == "pod-delete-failed"]
            assert [r.reason for r in failed] == ["Timeout"]
            assert "delete timed out after 1.5s" in failed[0].getMessage()
            rule.release.set()
            await settle(lambda: not http_cluster.pods())
        nursery.cancel_scope.cancel()


async def test_cancelled_mid_create_deletes_by_label(
        http_cluster: EmbeddedCluster, aio_loop: None) -> None:
    """The create reached the server but its response did not reach us: find it by label."""
    proxy = StallProxy(("127.0.0.1", int(http_cluster.url.rsplit(":", 1)[1])))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(proxy.serve)
        config = config_for(f"http://127.0.0.1:{port}")
        async with open_kube_client(config) as kube:
            rule = proxy.stall(b"POST /api/v1/namespaces/default/pods", to="client")
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as inner:
                    async def connect() -> None:
                        async with handler(config, kube, "mid-create").connected("alice"):
                            pytest.fail("cancelled before the pod started")

                    inner.start_soon(connect)
                    await rule.hit.wait()
                    await settle(lambda: http_cluster.pods())
                    scope.cancel()
            created = [e for e in http_cluster.request_log.entries if e.method == "POST"]
            listed = [e for e in http_cluster.request_log.entries
                      if e.method == "GET" and e.pod is None and e.seq > created[0].seq]
            assert listed, "the handler looked the pod up by its label"
            assert [e.pod for e in deletes(http_cluster)] == [
                http_cluster.pods()[0]["metadata"]["name"]] or not http_cluster.pods()
            await settle(lambda: not http_cluster.pods())
        nursery.cancel_scope.cancel()


async def test_default_config_works_on_the_embedded_cluster(
        cluster: EmbeddedCluster, aio_loop: None) -> None:
    default = KubernetesConfig.default()
    config = parse_config({"connection": {"kubeconfig": str(cluster.kubeconfig_path)}})
    assert config.pod == default.pod and config.timeouts == default.timeouts
    async with open_kube_client(config) as kube, handler(config, kube).connected("alice") as pod:
        spec = cluster.store.get_pod(pod.namespace, pod.name)["spec"]
        assert spec["containers"][0]["image"] == "busybox"
    await settle(lambda: not cluster.pods())


async def test_auth_metadata_reaches_labels_annotations_env(
        cluster: EmbeddedCluster, aio_loop: None) -> None:
    config = config_for(str(cluster.kubeconfig_path), pod={
        "exposeAuthMetadataAsEnv": {"team": "TEAM"},
        "exposeAuthMetadataAsLabels": {"team": "example.com/team"},
        "exposeAuthMetadataAsAnnotations": {"ticket": "example.com/ticket"},
    })
    auth = AuthResult(metadata={"team": "Ops Team/ü", "ticket": "T-1 ✓"})
    async with open_kube_client(config) as kube, \
            handler(config, kube).connected("alice", auth) as pod:
        stored = cluster.store.get_pod(pod.namespace, pod.name)
    meta = stored["metadata"]
    assert meta["labels"]["example.com/team"].startswith("Ops-Team-u-")
    assert meta["annotations"]["example.com/ticket"] == "T-1 ✓"
    env = {e["name"]: e.get("value") for e in stored["spec"]["containers"][0]["env"]}
    assert env["TEAM"] == "Ops Team/ü"
