"""The fault injector records what each fault hit (the soak's excuses depend on it)."""

from __future__ import annotations

import trio

from kuberun_trio.cluster import EmbeddedCluster
from kuberun_trio.cluster.faults import MAX_HITS, Faults


async def http_get(cluster: EmbeddedCluster, path: str) -> int:
    """One plain-HTTP GET with the cluster's token; the response status."""
    host, port = cluster.url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                              f"Authorization: Bearer {cluster.token}\r\n\r\n".encode())
        head = b""
        while b"\r\n" not in head:
            head += await stream.receive_some(4096)
    return int(head.split()[1])


async def test_request_faults_record_the_request_and_its_pod(
        http_cluster: EmbeddedCluster) -> None:
    faults = http_cluster.faults
    faults.fail_requests("get", "pods", 1, code=500)
    faults.fail_requests("list", "pods", 1, code=429, retry_after=1)
    assert await http_get(http_cluster, "/api/v1/namespaces/default/pods/p1") == 500
    assert await http_get(http_cluster, "/api/v1/namespaces/default/pods?labelSelector=a%3Db") \
        == 429
    assert await http_get(http_cluster, "/api/v1/namespaces/default/pods/p1") == 404  # spent
    first, second = faults.hits
    assert (first.kind, first.target, first.pod) == (
        "api-500", "GET /api/v1/namespaces/default/pods/p1", "p1")
    assert (second.kind, second.target, second.pod) == (
        "api-429", "GET /api/v1/namespaces/default/pods?labelSelector=a%3Db", None)
    assert first.time <= second.time <= trio.current_time()


async def test_exec_cut_watch_drop_and_evict_record_their_targets(
        http_cluster: EmbeddedCluster) -> None:
    faults = http_cluster.faults
    faults.cut_exec("p2")
    assert faults.hits == type(faults.hits)()  # armed, not yet bitten
    assert faults.take_exec_cut("p1") is None
    assert faults.take_exec_cut("p2") == 0
    faults.drop_watches()
    http_cluster.store.create_pod("default", {"metadata": {"name": "p3"}, "spec": {
        "containers": [{"name": "c", "image": "busybox", "command": ["sleep", "60"]}]}})
    with trio.fail_after(30):
        while http_cluster.store.get_pod("default", "p3")["status"].get("phase") != "Running":
            await trio.sleep(0.02)
    await faults.evict("default", "p3")
    assert [(h.kind, h.target, h.pod) for h in faults.hits] == [
        ("exec-cut", "exec stream of pod p2", "p2"),
        ("watch-drop", "every open watch", None),
        ("evict", "pod default/p3", "p3"),
    ]


async def test_the_record_is_bounded() -> None:
    faults = Faults()
    for _ in range(MAX_HITS + 5):
        faults.drop_watches()
    assert len(faults.hits) == MAX_HITS
