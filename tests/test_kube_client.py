"""kuberun_trio.aio.kube: the gateway's Kubernetes client, against the embedded cluster.

Pure parts (token bucket, retry delays, pod-state judgement) are tested directly; the
rest runs against a real embedded cluster over HTTPS or real loopback sockets.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from kuberun_trio.aio.bridge import open_aio_loop
from kuberun_trio.aio.kube import KubeClient, RetryPolicy, TokenBucket, open_kube_client
from kuberun_trio.cluster import EmbeddedCluster
from kuberun_trio.core.config import KubernetesConfig, parse_config
from kuberun_trio.core.podstate import (
    PodLoss,
    last_warning,
    pod_loss,
    pod_ready,
    pod_start_failure,
)
from kuberun_trio.errors import ConfigError, KubernetesError, NotFoundError, PodStartError

NS = "default"
FAST = RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.05)


@pytest.fixture
async def aio_loop() -> AsyncIterator[None]:
    async with open_aio_loop():
        yield


def config(connection: dict[str, Any], http: float = 10.0) -> KubernetesConfig:
    return parse_config({"connection": connection, "timeouts": {"http": http}})


def kubeconfig_of(cluster: EmbeddedCluster, **extra: Any) -> KubernetesConfig:
    return config({"kubeconfig": str(cluster.kubeconfig_path), **extra})


def pod_body(name: str, *command: str, image: str = "busybox",
             restart: str = "Never") -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"app": "kube-test"}},
            "spec": {"restartPolicy": restart, "terminationGracePeriodSeconds": 1,
                     "containers": [{"name": "c", "image": image,
                                     "command": list(command or ("sleep", "3600"))}]}}


def new_name() -> str:
    return f"kc-{uuid.uuid4().hex[:8]}"


async def create(kc: KubeClient, name: str, *command: str, **kw: Any) -> str:
    created = await kc.create_pod(NS, pod_body(name, *command, **kw))
    assert created["metadata"]["name"] == name
    rv: str = created["metadata"]["resourceVersion"]
    return rv


async def start(kc: KubeClient, *command: str, **kw: Any) -> tuple[str, dict[str, Any]]:
    name = new_name()
    rv = await create(kc, name, *command, **kw)
    try:
        with trio.fail_after(20):
            return name, await kc.wait_for_pod(NS, name, resource_version=rv)
    except trio.TooSlowError:
        pod = await kc.get_pod(NS, name)
        raise AssertionError(f"pod {name} still {pod['status']} ({kc!r})") from None


def logged(cluster: EmbeddedCluster, method: str, path: str) -> list[int]:
    return [e.status for e in cluster.request_log.entries
            if e.kind == "http" and e.method == method and e.path == path]


async def wait_until(predicate: Any) -> None:
    with trio.fail_after(10):
        while not predicate():
            await trio.sleep(0.02)


# == pure parts ==================================================================================


def test_token_bucket_allows_burst_then_paces_at_rate() -> None:
    bucket = TokenBucket(rate=4.0, burst=2)
    assert [bucket.reserve(10.0) for _ in range(4)] == [0.0, 0.0, 0.25, 0.5]
    # one second later the debt of 2 tokens is paid and 2 of 4 new ones are spent
    assert bucket.reserve(11.0) == 0.0
    assert bucket.reserve(11.0) == 0.0
    assert bucket.reserve(11.0) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="burst"):
        TokenBucket(rate=1.0, burst=0)


def test_retry_delays_grow_are_capped_and_honour_retry_after() -> None:
    policy = RetryPolicy(attempts=9, base_delay=0.1, max_delay=1.0)
    delays = [policy.delay(n) for n in range(6)]
    assert all(0.075 <= d <= 1.0 for d in delays)
    assert delays[3] > delays[0] and max(delays) <= 1.0
    assert policy.delay(0, retry_after=3) == 3
    assert policy.delay(0, retry_after=3600) == 12.0


def status(phase: str = "Pending", *, waiting: dict[str, str] | None = None,
           conditions: list[dict[str, str]] | None = None, **extra: Any) -> dict[str, Any]:
    state = {"waiting": waiting} if waiting else {"running": {"startedAt": "t"}}
    return {"metadata": {"name": "p", **extra.pop("meta", {})},
            "status": {"phase": phase, "conditions": conditions or [],
                       "containerStatuses": [{"name": "c", "state": state, "ready": False,
                                              "restartCount": 0, "image": "i", "imageID": ""}],
                       **extra}}


READY = [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}]


@pytest.mark.parametrize(("pod", "expected"), [
    (status("Pending", waiting={"reason": "ContainerCreating"}), None),
    (status("Running", conditions=READY), None),
    (status("Pending", waiting={"reason": "ErrImagePull", "message": "pull failed"}),
     ("ErrImagePull", "pull failed")),
    (status("Pending", waiting={"reason": "ImagePullBackOff", "message": "Back-off pulling"}),
     ("ImagePullBackOff", "Back-off pulling")),
    (status("Running", waiting={"reason": "CrashLoopBackOff", "message": "back-off 10s"}),
     ("CrashLoopBackOff", "back-off 10s")),
    (status("Pending", waiting={"reason": "CreateContainerConfigError", "message": "no cm"}),
     ("CreateContainerConfigError", "no cm")),
    (status("Failed", reason="Evicted", message="low on memory"), ("Evicted", "low on memory")),
    (status("Pending", conditions=[{"type": "PodScheduled", "status": "False",
                                    "reason": "Unschedulable", "message": "0/1 nodes"}]),
     ("Unschedulable", "0/1 nodes")),
    (status("Running", conditions=READY, meta={"deletionTimestamp": "t"}),
     ("PodDeleted", "the pod is being deleted")),
])  # fmt: skip
def test_pod_start_failure(pod: dict[str, Any], expected: tuple[str, str] | None) -> None:
    assert pod_start_failure(pod) == expected


def test_pod_start_failure_of_exited_pod_names_exit_code() -> None:
    pod = status("Failed")
    pod["status"]["containerStatuses"][0]["state"] = {
        "terminated": {"exitCode": 3, "reason": "Error"}}
    assert pod_start_failure(pod) == ("Failed", "container c terminated: Error, exit code 3")


def test_pod_ready_needs_running_and_ready_condition() -> None:
    assert pod_ready(status("Running", conditions=READY))
    assert not pod_ready(status("Pending", conditions=READY))
    assert not pod_ready(status("Running", conditions=[{"type": "Ready", "status": "False"}]))


def test_pod_loss() -> None:
    running = status("Running", conditions=READY)
    assert pod_loss(running) is None
    assert pod_loss(None) == PodLoss("Deleted", "the pod was deleted")
    assert pod_loss(status("Failed", reason="Evicted", message="m")) == PodLoss("Evicted", "m")
    stopped = status("Running", conditions=READY)
    stopped["status"]["containerStatuses"][0]["state"] = {
        "terminated": {"exitCode": 137, "reason": "Error"}}
    assert pod_loss(stopped) == PodLoss("ContainerStopped",
                                        "container c stopped: Error, exit code 137")
    assert pod_loss(stopped, container="other") is None


def test_pod_loss_ignores_a_stale_state_from_before_the_start() -> None:
    # A shared watch lagging under load can deliver the pod's ContainerCreating state
    # after the pod was seen Ready through a GET: that is not a loss (seen at 1000
    # concurrent connections: sessions ended with "container shell stopped: ContainerCreating").
    creating = status("Pending")
    creating["status"]["containerStatuses"][0]["state"] = {
        "waiting": {"reason": "ContainerCreating"}}
    creating["status"]["containerStatuses"][0]["restartCount"] = 0
    assert pod_loss(creating) is None
    crashed = status("Running")
    crashed["status"]["containerStatuses"][0].update(
        state={"waiting": {"reason": "CrashLoopBackOff"}}, restartCount=1,
        lastState={"terminated": {"exitCode": 1, "reason": "Error"}})
    assert pod_loss(crashed) == PodLoss("ContainerStopped",
                                        "container c stopped: Error, exit code 1")


def test_last_warning_picks_newest_warning() -> None:
    events = [{"type": "Warning", "message": "old", "lastTimestamp": "2024-01-01T00:00:01Z"},
              {"type": "Normal", "message": "pulling", "lastTimestamp": "2024-01-01T00:00:09Z"},
              {"type": "Warning", "message": "new", "lastTimestamp": "2024-01-01T00:00:05Z"},
              {"type": "Warning", "message": "Error: ErrImagePull",
               "lastTimestamp": "2024-01-01T00:00:05Z", "metadata": {"resourceVersion": "9"}}]
    assert last_warning(events) == "new"
    assert last_warning(events[1:2]) is None


# == configuration sources =======================================================================


async def test_kubeconfig_create_wait_get_list_delete(
        cluster: EmbeddedCluster, aio_loop: None) -> None:
    async with open_kube_client(kubeconfig_of(cluster)) as kc:
        name, pod = await start(kc)
        assert pod_ready(pod) and pod["status"]["phase"] == "Running"
        got = await kc.get_pod(NS, name)
        assert got["metadata"]["uid"] == pod["metadata"]["uid"]
        assert name in [p["metadata"]["name"] for p in await kc.list_pods(NS, "app=kube-test")]
        assert await kc.list_pods(NS, "app=someone-else") == []
        await kc.delete_pod(NS, name, grace_period_seconds=0)
        await kc.delete_pod(NS, name, grace_period_seconds=0)  # already gone: fine
        with pytest.raises(NotFoundError):
            await kc.get_pod(NS, name)
        assert "requests=" in repr(kc)
    assert logged(cluster, "DELETE", f"/api/v1/namespaces/{NS}/pods/{name}") == [200, 404]


async def test_explicit_connection_ca_file_and_token(
        cluster: EmbeddedCluster, aio_loop: None) -> None:
    assert cluster.ca_file is not None
    assert cluster.url.startswith("https://")
    cfg = config({"host": cluster.url.removeprefix("https://"),  # host:port means https
                  "cacertFile": str(cluster.ca_file), "bearerToken": cluster.token})
    async with open_kube_client(cfg) as kc:
        name = new_name()
        await create(kc, name)
        assert [p["metadata"]["name"] for p in await kc.list_pods(NS)] == [name]


async def test_explicit_connection_inline_ca_and_rotating_token_file(
        cluster: EmbeddedCluster, aio_loop: None, tmp_path: Path) -> None:
    assert cluster.ca_file is not None
    token_file = tmp_path / "token"
    token_file.write_text("not-the-token\n")
    cfg = config({"host": cluster.url, "cacert": cluster.ca_file.read_text(),
                  "bearerTokenFile": str(token_file)})
    async with open_kube_client(cfg) as kc:
        with pytest.raises(KubernetesError) as info:
            await kc.list_pods(NS)
        assert (info.value.status, info.value.reason) == (401, "Unauthorized")
        token_file.write_text(cluster.token + "\n")  # rotated: the next request uses it
        assert await kc.list_pods(NS) == []


async def test_wrong_ca_is_refused(cluster: EmbeddedCluster, aio_loop: None,
                                   tmp_path: Path) -> None:
    other = tmp_path / "other-ca.pem"
    other.write_text(_self_signed_ca())
    cfg = config({"host": cluster.url, "cacertFile": str(other), "bearerToken": cluster.token})
    async with open_kube_client(cfg, rest_retry=FAST) as kc:
        with pytest.raises(KubernetesError) as info:
            await kc.list_pods(NS)
        assert info.value.status == 0 and "certificate" in str(info.value).lower()
    insecure = config({"host": cluster.url, "insecure": True, "bearerToken": cluster.token})
    async with open_kube_client(insecure) as kc:
        assert await kc.list_pods(NS) == []


def _self_signed_ca() -> str:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not-the-cluster-ca")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))  # fmt: skip
    return cert.public_bytes(serialization.Encoding.PEM).decode()


async def test_missing_kubeconfig_is_a_config_error(aio_loop: None, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        async with open_kube_client(config({"kubeconfig": str(tmp_path / "absent")})):
            pass
    assert info.value.path == "kubernetes.connection.kubeconfig"


async def test_path_must_name_the_core_group(aio_loop: None) -> None:
    with pytest.raises(ConfigError) as info:
        async with open_kube_client(config({"host": "https://127.0.0.1:1", "path": "/apis"})):
            pass
    assert info.value.path == "kubernetes.connection.path"


async def test_proxy_variables_are_ignored(cluster: EmbeddedCluster, aio_loop: None,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # discard port: nothing listens
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    async with open_kube_client(kubeconfig_of(cluster), rest_retry=FAST) as kc:
        assert await kc.list_pods(NS) == []


# == start failures ==============================================================================


async def test_image_pull_failure_is_a_pod_start_error(
        cluster: EmbeddedCluster, aio_loop: None) -> None:
    cluster.faults.fail_image("registry.invalid/*")
    async with open_kube_client(kubeconfig_of(cluster)) as kc:
        with pytest.raises(PodStartError) as info:
            await start(kc, image="registry.invalid/nope:1")
        assert info.value.reason in ("ErrImagePull", "ImagePullBackOff")
        assert "registry.invalid/nope:1" in info.value.message
        events = await kc.events_for_pod(NS, info.value.pod)
        assert all(e["involvedObject"]["name"] == info.value.pod for e in events)
        warning = last_warning(events)
        assert warning is not None and 'Failed to pull image "registry.invalid/nope:1"' in warning


async def test_crash_loop_is_a_pod_start_error(cluster: EmbeddedCluster, aio_loop: None) -> None:
    # A command that cannot start never runs (StartError), so the pod is never Ready first.
    async with open_kube_client(kubeconfig_of(cluster)) as kc:
        with pytest.raises(PodStartError) as info:
            await start(kc, "/nonexistent/kuberun-idle", restart="Always")
        assert info.value.reason == "CrashLoopBackOff"
        assert "back-off" in info.value.message


async def test_deleted_while_waiting(cluster: EmbeddedCluster, aio_loop: None) -> None:
    cluster.faults.delay_start(5, "slow*")
    async with open_kube_client(kubeconfig_of(cluster)) as kc:
        name = new_name()
        rv = await create(kc, name, image="slow:1")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(kc.delete_pod, NS, name, 0)
            with trio.fail_after(10), pytest.raises(PodStartError) as info:
                await kc.wait_for_pod(NS, name, resource_version=rv)
        assert info.value.reason == "PodDeleted"


# == retries =====================================================================================


async def test_create_retried_after_429_honours_retry_after(
        cluster: EmbeddedCluster, aio_loop: None) -> None:
    cluster.faults.fail_requests("create", "pods", 1, code=429, retry_after=1)
    async with open_kube_client(kubeconfig_of(cluster)) as kc:
        before = trio.current_time()
        await create(kc, new_name())
        assert trio.current_time() - before >= 0.9
        assert kc.statistics().retries == 1
    assert logged(cluster, "POST", f"/api/v1/namespaces/{NS}/pods") == [429, 201]


async def test_create_not_retried_after_500(cluster: EmbeddedCluster, aio_loop: None) -> None:
    cluster.faults.fail_requests("create", "pods", 1, code=500)
    async with open_kube_client(kubeconfig_of(cluster)) as kc:
        with pytest.raises(KubernetesError) as info:
            await create(kc, new_name())
        assert (info.value.status, info.value.reason) == (500, "InternalError")
    assert logged(cluster, "POST", f"/api/v1/namespaces/{NS}/pods") == [500]


async def test_list_retried_after_500s(cluster: EmbeddedCluster, aio_loop: None) -> None:
    cluster.faults.fail_requests("list", "pods", 2, code=500)
    async with open_kube_client(kubeconfig_of(cluster)) as kc:
        assert await kc.list_pods(NS) == []
        assert kc.statistics().retries == 2
    assert logged(cluster, "GET", f"/api/v1/namespaces/{NS}/pods") == [500, 500, 200]


async def test_list_gives_up_after_the_policy(cluster: EmbeddedCluster, aio_loop: None) -> None:
    cluster.faults.fail_requests("list", "pods", 5, code=503)
    async with open_kube_client(kubeconfig_of(cluster), rest_retry=FAST) as kc:
        with pytest.raises(KubernetesError) as info:
            await kc.list_pods(NS)
        assert info.value.status == 503
    assert logged(cluster, "GET", f"/api/v1/namespaces/{NS}/pods") == [503, 503]


# == watches =====================================================================================


@pytest.mark.parametrize("fault", ["drop_watches", "expire_watches"])
async def test_wait_survives_dropped_and_expired_watches(
        cluster: EmbeddedCluster, aio_loop: None, fault: str) -> None:
    cluster.faults.delay_start(1.5, "slow*")
    async with open_kube_client(kubeconfig_of(cluster)) as kc:
        name = new_name()
        rv = await create(kc, name, image="slow:1")
        result: list[dict[str, Any]] = []

        async def waiter() -> None:
            result.append(await kc.wait_for_pod(NS, name, resource_version=rv))

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(waiter)
                await wait_until(lambda: kc.statistics().watches_opened >= 1)
                getattr(cluster.faults, fault)()
        assert pod_ready(result[0])
        stats = kc.statistics()
        assert stats.watch_resumes >= 1
        assert stats.watches_opened >= 2
        if fault == "expire_watches":
            assert stats.relists >= 1


async def test_watch_open_retried_after_500_and_refused_after_400(
        cluster: EmbeddedCluster, aio_loop: None) -> None:
    watch_path = f"/api/v1/namespaces/{NS}/pods"
    async with open_kube_client(kubeconfig_of(cluster)) as kc:
        cluster.faults.fail_requests("watch", "pods", 2, code=500)
        _, pod = await start(kc)
        assert pod_ready(pod)
        assert logged(cluster, "GET", watch_path)[:2] == [500, 500]
        cluster.faults.fail_requests("watch", "pods", 1, code=400)
        name = new_name()
        rv = await create(kc, name)
        with pytest.raises(KubernetesError) as info:
            await kc.wait_for_pod(NS, name, resource_version=rv)
        assert info.value.status == 400


async def test_watch_pod_gone_or_failed(cluster: EmbeddedCluster, aio_loop: None) -> None:
    async with open_kube_client(kubeconfig_of(cluster)) as kc:
        killed, _ = await start(kc)
        evicted, _ = await start(kc)
        deleted, _ = await start(kc)
        losses: dict[str, PodLoss] = {}

        async def watch(name: str) -> None:
            losses[name] = await kc.watch_pod_gone_or_failed(NS, name, "c")

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for name in (killed, evicted, deleted):
                    nursery.start_soon(watch, name)
                await wait_until(lambda: kc.statistics().watches_opened >= 3)
                await trio.sleep(0.2)
                assert losses == {}
                await cluster.faults.kill(NS, killed)
                await cluster.faults.evict(NS, evicted)
                await kc.delete_pod(NS, deleted, grace_period_seconds=5)
        assert losses[killed].reason in ("ContainerStopped", "Failed")
        assert "137" in losses[killed].message
        assert losses[evicted].reason == "Evicted"
        assert losses[deleted].reason == "Terminating"


# == transport ===================================================================================


async def test_rate_limit_paces_requests(cluster: EmbeddedCluster, aio_loop: None) -> None:
    async with open_kube_client(kubeconfig_of(cluster, qps=5, burst=1)) as kc:
        before = trio.current_time()
        for _ in range(5):
            await kc.list_pods(NS)
        assert trio.current_time() - before >= 0.75
        assert kc.statistics().throttled_seconds >= 0.75


async def test_http_timeout_against_a_silent_server(aio_loop: None) -> None:
    connections = 0

    async def silent(stream: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, silent, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        cfg = config({"host": f"http://127.0.0.1:{port}", "bearerToken": "t"}, http=0.3)
        async with open_kube_client(cfg, rest_retry=FAST) as kc:
            with trio.fail_after(5), pytest.raises(KubernetesError) as info:
                await kc.get_pod(NS, "p")
        nursery.cancel_scope.cancel()
    assert (info.value.status, info.value.reason) == (0, "Timeout")
    assert connections == 2  # retried once: a get is idempotent


async def test_connection_refused(aio_loop: None) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    cfg = config({"host": f"http://127.0.0.1:{port}", "bearerToken": "t"})
    async with open_kube_client(cfg, rest_retry=FAST) as kc:
        with pytest.raises(KubernetesError) as info:
            await kc.create_pod(NS, pod_body("p"))
        assert info.value.status == 0
        assert kc.statistics().retries == 1  # never sent, so even a create is retried
