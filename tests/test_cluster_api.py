"""The embedded cluster's REST handlers: called directly, and through HTTP by kubernetes-asyncio."""

from __future__ import annotations

import contextlib
import functools
import json
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing
import trio_asyncio
from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException

from kuberun_trio.aio.bridge import open_aio_loop
from kuberun_trio.cluster import api, status
from kuberun_trio.cluster.faults import Faults
from kuberun_trio.cluster.http import ApiServer, Routes, serve_api
from kuberun_trio.cluster.httptypes import Reply, Request, Response, StreamResponse
from kuberun_trio.cluster.requestlog import RequestLog
from kuberun_trio.cluster.store import Store

TABLE_ACCEPT = (
    "application/json;as=Table;v=v1;g=meta.k8s.io,"
    "application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json"
)
DISCOVERY_ACCEPT = (
    "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,"
    "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json"
)


def req(
    method: str, target: str, body: Any = None, headers: dict[str, str] | None = None
) -> Request:
    path, _, query = target.partition("?")
    raw = b"" if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    return Request(
        method=method,
        path=path,
        query=urllib.parse.parse_qs(query, keep_blank_values=True),
        headers={"host": "127.0.0.1:6443", **(headers or {})},
        body=raw,
    )


async def fake_logs(
    ns: str, pod: str, container: str, *, follow: bool, previous: bool = False
) -> AsyncIterator[bytes]:
    """Shaped like ``Kubelet.logs``: await it (errors raise here), then iterate."""
    await trio.lowlevel.checkpoint()
    if previous:
        raise status.bad_request(
            f'previous terminated container "{container}" in pod "{pod}" not found'
        )

    async def lines() -> AsyncIterator[bytes]:
        yield f"{ns}/{pod}/{container} 1\n".encode()
        yield b"two\nthree\n"
        if follow:
            await trio.sleep(1)
            yield b"four\n"

    return lines()


@pytest.fixture
def ctx() -> api.ApiContext:
    return api.ApiContext(store=Store(bookmark_interval=2), faults=Faults(), logs=fake_logs)


async def call(ctx: api.ApiContext, *args: Any, **kwargs: Any) -> Response:
    reply = await api.handle(req(*args, **kwargs), ctx)
    assert isinstance(reply, Response)
    return reply


async def call_json(ctx: api.ApiContext, *args: Any, **kwargs: Any) -> tuple[int, Any]:
    reply = await call(ctx, *args, **kwargs)
    return reply.status, json.loads(reply.body)


async def api_error(ctx: api.ApiContext, *args: Any, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    with pytest.raises(status.ApiStatusError) as info:
        await api.handle(req(*args, **kwargs), ctx)
    return info.value.code, json.loads(info.value.body)


def pod_body(name: str, **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]},
    }


async def stream_lines(reply: Reply, limit: int | None = None) -> list[dict[str, Any]]:
    assert isinstance(reply, StreamResponse)
    assert (reply.status, reply.content_type) == (200, "application/json")
    out = []
    async with contextlib.aclosing(reply.chunks()) as chunks:  # type: ignore[type-var]
        async for chunk in chunks:
            assert chunk.endswith(b"\n") and chunk.count(b"\n") == 1
            out.append(json.loads(chunk))
            if limit is not None and len(out) == limit:
                break
    return out


# -- discovery ---------------------------------------------------------------------


async def test_version_and_legacy_discovery(ctx: api.ApiContext) -> None:
    code, version = await call_json(ctx, "GET", "/version?timeout=32s")
    assert code == 200
    assert (version["major"], version["minor"], version["gitVersion"]) == ("1", "33", "v1.33.0")
    assert version["platform"] == "linux/amd64" and version["goVersion"].startswith("go1.")
    _, versions = await call_json(ctx, "GET", "/api")
    assert versions == {
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [
            {"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1:6443"}
        ],
    }
    _, resources = await call_json(ctx, "GET", "/api/v1")
    by_name = {r["name"]: r for r in resources["resources"]}
    assert by_name["pods"]["shortNames"] == ["po"] and by_name["pods"]["categories"] == ["all"]
    assert {"pods/exec", "pods/attach", "pods/portforward", "pods/log", "pods/status"} <= set(
        by_name
    )
    assert {"create", "get"} <= set(by_name["pods/exec"]["verbs"])
    _, groups = await call_json(ctx, "GET", "/apis")
    v1 = {"groupVersion": "coordination.k8s.io/v1", "version": "v1"}
    coordination = {"name": "coordination.k8s.io", "versions": [v1], "preferredVersion": v1}
    assert groups == {"kind": "APIGroupList", "apiVersion": "v1", "groups": [coordination]}
    _, group = await call_json(ctx, "GET", "/apis/coordination.k8s.io")
    assert group == {"kind": "APIGroup", "apiVersion": "v1", **coordination}
    _, leases = await call_json(ctx, "GET", "/apis/coordination.k8s.io/v1")
    assert leases["groupVersion"] == "coordination.k8s.io/v1"
    assert [(r["name"], r["kind"], r["namespaced"]) for r in leases["resources"]] == [
        ("leases", "Lease", True)]


async def test_aggregated_discovery(ctx: api.ApiContext) -> None:
    reply = await call(ctx, "GET", "/api", headers={"accept": DISCOVERY_ACCEPT})
    assert reply.content_type == (
        "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"
    )
    doc = json.loads(reply.body)
    assert (doc["kind"], doc["apiVersion"]) == ("APIGroupDiscoveryList", "apidiscovery.k8s.io/v2")
    (version,) = doc["items"][0]["versions"]
    pods = next(r for r in version["resources"] if r["resource"] == "pods")
    assert pods["scope"] == "Namespaced" and pods["singularResource"] == "pod"
    assert {s["subresource"] for s in pods["subresources"]} >= {"exec", "log", "status"}
    apis = await call(ctx, "GET", "/apis", headers={"accept": DISCOVERY_ACCEPT})
    (group,) = json.loads(apis.body)["items"]
    assert group["metadata"]["name"] == "coordination.k8s.io"
    (lease,) = group["versions"][0]["resources"]
    assert (lease["resource"], lease["scope"], lease["responseKind"]) == (
        "leases", "Namespaced", {"group": "coordination.k8s.io", "version": "v1", "kind": "Lease"})
    assert {"create", "get", "list", "watch", "update", "delete"} <= set(lease["verbs"])
    beta = await call(
        ctx,
        "GET",
        "/api",
        headers={
            "accept": "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList"
        },
    )
    assert json.loads(beta.body)["apiVersion"] == "apidiscovery.k8s.io/v2beta1"


async def test_unknown_paths_and_methods(ctx: api.ApiContext) -> None:
    code, body = await api_error(ctx, "GET", "/api/v1/namespaces/default/widgets")
    assert (code, body["message"], body["details"]) == (
        404,
        "the server could not find the requested resource",
        {},
    )
    assert (await api_error(ctx, "GET", "/openapi/v2"))[0] == 404
    plain = await call(ctx, "GET", "/nothing-here")
    assert (plain.status, plain.body, plain.content_type) == (
        404,
        b"404 page not found\n",
        "text/plain; charset=utf-8",
    )
    code, body = await api_error(ctx, "PUT", "/api/v1/namespaces/default/pods")
    assert (code, body["reason"]) == (405, "MethodNotAllowed")


# -- pods, namespaces, events --------------------------------------------------------


async def test_pod_create_get_list_delete(ctx: api.ApiContext) -> None:
    code, pod = await call_json(
        ctx,
        "POST",
        "/api/v1/namespaces/default/pods?fieldManager=kubectl-run",
        pod_body("web", app="web"),
    )
    assert code == 201
    assert (pod["kind"], pod["status"]["phase"]) == ("Pod", "Pending")
    assert pod["metadata"]["managedFields"][0]["manager"] == "kubectl-run"
    await call_json(ctx, "POST", "/api/v1/namespaces/default/pods", pod_body("db", app="db"))
    code, same = await call_json(ctx, "GET", "/api/v1/namespaces/default/pods/web")
    assert (code, same["metadata"]["uid"]) == (200, pod["metadata"]["uid"])
    _, st = await call_json(ctx, "GET", "/api/v1/namespaces/default/pods/web/status")
    assert st["metadata"]["uid"] == pod["metadata"]["uid"]

    _, listing = await call_json(
        ctx, "GET", "/api/v1/namespaces/default/pods?labelSelector=app%3Dweb"
    )
    assert [p["metadata"]["name"] for p in listing["items"]] == ["web"]
    assert "kind" not in listing["items"][0]
    _, everywhere = await call_json(ctx, "GET", "/api/v1/pods?fieldSelector=metadata.name%21%3Dweb")
    assert [p["metadata"]["name"] for p in everywhere["items"]] == ["db"]
    code, body = await api_error(ctx, "GET", "/api/v1/namespaces/default/pods?labelSelector=a+in+(")
    assert (code, body["reason"]) == (400, "BadRequest")
    code, body = await api_error(ctx, "GET", "/api/v1/pods?fieldSelector=spec.image%3Dx")
    assert (code, body["message"]) == (400, "field label not supported: spec.image")

    code, body = await api_error(ctx, "POST", "/api/v1/namespaces/default/pods", pod_body("web"))
    assert (code, body["message"]) == (409, 'pods "web" already exists')
    code, body = await api_error(ctx, "POST", "/api/v1/namespaces/nope/pods", pod_body("x"))
    assert (code, body["message"]) == (404, 'namespaces "nope" not found')
    code, body = await api_error(ctx, "POST", "/api/v1/namespaces/default/pods", b"{not json")
    assert code == 400

    ctx.store.update_pod("default", "web", lambda p: p["spec"].update(nodeName="n1"))
    code, deleted = await call_json(
        ctx, "DELETE", "/api/v1/namespaces/default/pods/web?gracePeriodSeconds=7"
    )
    assert (code, deleted["metadata"]["deletionGracePeriodSeconds"]) == (200, 7)
    code, deleted = await call_json(
        ctx, "DELETE", "/api/v1/namespaces/default/pods/web", {"gracePeriodSeconds": 3}
    )
    assert deleted["metadata"]["deletionGracePeriodSeconds"] == 3
    code, gone = await call_json(ctx, "DELETE", "/api/v1/namespaces/default/pods/db")
    assert (code, gone["metadata"]["name"]) == (200, "db")
    code, body = await api_error(ctx, "GET", "/api/v1/namespaces/default/pods/db")
    assert (code, body["details"]) == (404, {"name": "db", "kind": "pods"})


async def test_table_output_for_kubectl_get(ctx: api.ApiContext) -> None:
    await call(ctx, "POST", "/api/v1/namespaces/default/pods", pod_body("web"))
    reply = await call(
        ctx, "GET", "/api/v1/namespaces/default/pods?limit=500", headers={"accept": TABLE_ACCEPT}
    )
    assert reply.content_type == "application/json;as=Table;v=v1;g=meta.k8s.io"
    table = json.loads(reply.body)
    assert table["kind"] == "Table"
    assert [c["name"] for c in table["columnDefinitions"]][:5] == [
        "Name",
        "Ready",
        "Status",
        "Restarts",
        "Age",
    ]
    (row,) = table["rows"]
    assert row["cells"][:4] == ["web", "0/1", "Pending", "0"]
    assert row["object"]["kind"] == "PartialObjectMetadata"
    plain = await call(
        ctx, "GET", "/api/v1/namespaces/default/pods", headers={"accept": "application/json"}
    )
    assert json.loads(plain.body)["kind"] == "PodList"


async def test_namespaces_and_events(ctx: api.ApiContext) -> None:
    code, ns = await call_json(ctx, "POST", "/api/v1/namespaces", {"metadata": {"name": "team"}})
    assert (code, ns["kind"]) == (201, "Namespace")
    _, got = await call_json(ctx, "GET", "/api/v1/namespaces/team")
    assert got["status"] == {"phase": "Active"}
    _, pod = await call_json(ctx, "POST", "/api/v1/namespaces/team/pods", pod_body("p"))
    ctx.store.record_event(
        "team", pod, "Normal", "Scheduled", "assigned", component="default-scheduler"
    )
    selector = urllib.parse.quote(
        f"involvedObject.name=p,involvedObject.namespace=team,involvedObject.kind=Pod,"
        f"involvedObject.uid={pod['metadata']['uid']}"
    )
    _, events = await call_json(
        ctx, "GET", f"/api/v1/namespaces/team/events?fieldSelector={selector}"
    )
    assert events["kind"] == "EventList"
    assert [(e["reason"], e["source"]["component"]) for e in events["items"]] == [
        ("Scheduled", "default-scheduler")
    ]
    name = events["items"][0]["metadata"]["name"]
    _, one = await call_json(ctx, "GET", f"/api/v1/namespaces/team/events/{name}")
    assert (one["kind"], one["message"]) == ("Event", "assigned")


async def test_patch_labels(ctx: api.ApiContext) -> None:
    await call(ctx, "POST", "/api/v1/namespaces/default/pods", pod_body("p", app="a", old="x"))
    patch = {"metadata": {"labels": {"tier": "front", "old": None}}}
    _, pod = await call_json(
        ctx,
        "PATCH",
        "/api/v1/namespaces/default/pods/p",
        patch,
        headers={"content-type": "application/merge-patch+json"},
    )
    assert pod["metadata"]["labels"] == {"app": "a", "tier": "front"}
    code, _ = await api_error(
        ctx,
        "PATCH",
        "/api/v1/namespaces/default/pods/p",
        patch,
        headers={"content-type": "text/plain"},
    )
    assert code == 415


# -- watch ---------------------------------------------------------------------------


async def test_watch_stream(ctx: api.ApiContext, autojump_clock: trio.testing.MockClock) -> None:
    await call(ctx, "POST", "/api/v1/namespaces/default/pods", pod_body("a", app="x"))
    rv = ctx.store.resource_version
    await call(ctx, "POST", "/api/v1/namespaces/default/pods", pod_body("b", app="x"))
    base = "/api/v1/namespaces/default/pods?watch=True&labelSelector=app%3Dx"
    events = await stream_lines(await api.handle(req("GET", base + "&timeoutSeconds=5"), ctx))
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "a"),
        ("ADDED", "b"),
    ]
    assert events[0]["object"]["kind"] == "Pod"
    resumed = await stream_lines(
        await api.handle(req("GET", f"{base}&resourceVersion={rv}&timeoutSeconds=5"), ctx)
    )
    assert [e["object"]["metadata"]["name"] for e in resumed] == ["b"]
    marks = await stream_lines(
        await api.handle(
            req(
                "GET",
                f"{base}&resourceVersion={ctx.store.resource_version}"
                "&allowWatchBookmarks=true&timeoutSeconds=5",
            ),
            ctx,
        )
    )
    assert [e["type"] for e in marks] == ["BOOKMARK", "BOOKMARK"]
    ctx.store.expire_history()
    expired = await stream_lines(await api.handle(req("GET", f"{base}&resourceVersion={rv}"), ctx))
    assert [e["type"] for e in expired] == ["ERROR"]
    assert {k: expired[0]["object"][k] for k in ("code", "reason")} == {
        "code": 410,
        "reason": "Expired",
    }
    assert expired[0]["object"]["message"].startswith(f"too old resource version: {rv} (")


async def test_watch_is_dropped_by_fault(
    ctx: api.ApiContext, autojump_clock: trio.testing.MockClock
) -> None:
    reply = await api.handle(req("GET", "/api/v1/namespaces/default/pods?watch=1"), ctx)
    got: list[dict[str, Any]] = []
    async with trio.open_nursery() as nursery:

        async def consume() -> None:
            got.extend(await stream_lines(reply))

        nursery.start_soon(consume)
        await trio.sleep(1)
        await call(ctx, "POST", "/api/v1/namespaces/default/pods", pod_body("a"))
        await trio.sleep(1)
        ctx.faults.drop_watches()
    assert [e["type"] for e in got] == ["ADDED"]
    assert trio.current_time() < 10


async def test_watch_as_table(ctx: api.ApiContext, autojump_clock: trio.testing.MockClock) -> None:
    await call(ctx, "POST", "/api/v1/namespaces/default/pods", pod_body("a"))
    await call(ctx, "POST", "/api/v1/namespaces/default/pods", pod_body("b"))
    reply = await api.handle(
        req(
            "GET",
            "/api/v1/namespaces/default/pods?watch=true&timeoutSeconds=1",
            headers={"accept": TABLE_ACCEPT},
        ),
        ctx,
    )
    events = await stream_lines(reply)
    assert [e["object"]["kind"] for e in events] == ["Table", "Table"]
    assert (
        events[0]["object"]["columnDefinitions"]
        and events[1]["object"]["columnDefinitions"] is None
    )
    assert events[1]["object"]["rows"][0]["cells"][0] == "b"


# -- logs ----------------------------------------------------------------------------


async def test_pod_logs(ctx: api.ApiContext, autojump_clock: trio.testing.MockClock) -> None:
    await call(ctx, "POST", "/api/v1/namespaces/default/pods", pod_body("p"))
    log = "/api/v1/namespaces/default/pods/p/log"
    unscheduled = await call(ctx, "GET", log)
    assert (unscheduled.status, unscheduled.body) == (200, b"")

    ctx.store.update_pod("default", "p", lambda pod: pod["spec"].update(nodeName="n1"))
    full = await call(ctx, "GET", log)
    assert (full.body, full.content_type) == (b"default/p/c 1\ntwo\nthree\n", "text/plain")
    assert (await call(ctx, "GET", log + "?tailLines=2")).body == b"two\nthree\n"
    assert (await call(ctx, "GET", log + "?limitBytes=5")).body == b"defau"
    code, body = await api_error(ctx, "GET", log + "?container=nope")
    assert (code, body["message"]) == (400, "container nope is not valid for pod p")
    code, body = await api_error(ctx, "GET", log + "?previous=true")
    assert body["message"] == 'previous terminated container "c" in pod "p" not found'
    two = pod_body("two")
    two["spec"]["containers"].append({"name": "d", "image": "busybox"})
    await call(ctx, "POST", "/api/v1/namespaces/default/pods", two)
    code, body = await api_error(ctx, "GET", "/api/v1/namespaces/default/pods/two/log")
    assert body["message"] == "a container name must be specified for pod two, choose one of: [c d]"

    followed = await api.handle(req("GET", log + "?follow=true&container=c"), ctx)
    assert isinstance(followed, StreamResponse) and followed.content_type == "text/plain"
    start = trio.current_time()
    async with contextlib.aclosing(followed.chunks()) as chunks:  # type: ignore[type-var]
        data = b"".join([chunk async for chunk in chunks])
    assert data == b"default/p/c 1\ntwo\nthree\nfour\n"
    assert trio.current_time() - start == pytest.approx(1)


# -- through HTTP with kubernetes-asyncio ------------------------------------------------


async def test_kubernetes_asyncio_round_trip(
    ctx: api.ApiContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")

    async def no_streaming(request: Request, sub: str) -> Reply:
        raise status.path_not_found()

    server = ApiServer(
        routes=Routes(rest=functools.partial(api.handle, ctx=ctx), streaming=no_streaming),
        request_log=RequestLog(),
        faults=ctx.faults,
        token=None,
    )
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(functools.partial(serve_api, server, port=0))
        async with open_aio_loop():
            result = await trio_asyncio.aio_as_trio(_client_session)(f"http://{host}:{port}", ctx)
        nursery.cancel_scope.cancel()
    assert result["created"] == "web-1"
    assert result["listed"] == ["web-1"]
    assert result["resumed"] == [("ADDED", "web-2"), ("DELETED", "web-1")]
    assert result["expired"] == 410
    assert result["gone"] == 404


async def _client_session(host: str, ctx: api.ApiContext) -> dict[str, Any]:
    """asyncio-flavoured: the calls a gateway makes."""
    result: dict[str, Any] = {}
    cfg = client.Configuration(host=host)
    async with client.ApiClient(cfg) as api_client:
        v1 = client.CoreV1Api(api_client)
        created = await v1.create_namespaced_pod("default", pod_body("web-1", app="web"))
        result["created"] = created.metadata.name
        await v1.create_namespaced_pod("default", pod_body("other", app="db"))
        listing = await v1.list_namespaced_pod("default", label_selector="app=web")
        result["listed"] = [p.metadata.name for p in listing.items]
        rv = listing.metadata.resource_version
        await v1.create_namespaced_pod("default", pod_body("web-2", app="web"))
        await v1.delete_namespaced_pod("web-1", "default", grace_period_seconds=0)
        w = watch.Watch()
        result["resumed"] = [
            (e["type"], e["object"].metadata.name)
            async for e in w.stream(
                v1.list_namespaced_pod,
                "default",
                label_selector="app=web",
                resource_version=rv,
                timeout_seconds=1,
            )
        ]
        await w.close()
        ctx.store.expire_history()
        w = watch.Watch()
        try:
            async for _ in w.stream(
                v1.list_namespaced_pod, "default", resource_version=rv, timeout_seconds=1
            ):
                pass
        except ApiException as exc:
            result["expired"] = exc.status
        finally:
            await w.close()
        try:
            await v1.read_namespaced_pod("web-1", "default")
        except ApiException as exc:
            result["gone"] = exc.status
    return result
