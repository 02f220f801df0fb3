"""``coordination.k8s.io/v1`` Leases on the embedded cluster: kubectl and kubernetes-asyncio.

kubectl (the newest ``kubectl.1.NN`` and 1.30) finds the group through discovery and
prints the server's table; kubernetes-asyncio's ``CoordinationV1Api`` (the client the
gateway uses) creates, renews with optimistic concurrency, watches and deletes.
"""

from __future__ import annotations

import datetime
import json
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import trio
import trio_asyncio
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException
from support import kubectl_versions
from test_kubectl_conformance import kc

from kuberun_trio.aio.bridge import open_aio_loop
from kuberun_trio.cluster import EmbeddedCluster
from kuberun_trio.cluster.leases import format_micro_time
from kuberun_trio.cluster.store import Store

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

NO_OPENAPI = ("--validate=false", "-f", "-")
"""The embedded cluster serves no OpenAPI document: kubectl's client-side validation is off."""
LEASE_YAML = b"""apiVersion: coordination.k8s.io/v1
kind: Lease
metadata:
  name: gw-a
  labels: {app: kuberun}
spec:
  holderIdentity: gw-a_1234
  leaseDurationSeconds: 30
  renewTime: "2026-01-02T03:04:05.123456Z"
"""


@pytest.fixture(params=kubectl_versions() or ["kubectl"], ids=lambda p: p.rsplit("/", 1)[-1])
def kubectl(request: pytest.FixtureRequest) -> str:
    if not kubectl_versions():
        pytest.skip("kubectl is not installed")
    return str(request.param)


@pytest.fixture
async def aio_loop() -> AsyncIterator[None]:
    async with open_aio_loop():
        yield


def now() -> str:
    return format_micro_time(datetime.datetime.now(datetime.UTC))


def lease_body(name: str, holder: str = "me", duration: int = 30, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": name, "labels": {"app": "kuberun"}},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": duration,
                     "renewTime": now(), **spec}}


# -- kubectl ----------------------------------------------------------------------------------


async def test_kubectl_discovers_creates_lists_and_deletes(
        cluster: EmbeddedCluster, kubectl: str) -> None:
    resources = await kc(cluster, kubectl, "api-resources", "--api-group=coordination.k8s.io")
    line = [x for x in resources.stdout.decode().splitlines() if x.startswith("leases")]
    assert line and line[0].split() == ["leases", "coordination.k8s.io/v1", "true", "Lease"]

    # --validate=false: the embedded cluster serves no OpenAPI document (see its docs)
    await kc(cluster, kubectl, "create", "--validate=false", "-f", "-", stdin=LEASE_YAML)
    table = await kc(cluster, kubectl, "get", "leases")
    lines = table.stdout.decode().splitlines()
    assert lines[0].split() == ["NAME", "HOLDER", "AGE"]
    assert lines[1].split()[:2] == ["gw-a", "gw-a_1234"]

    out = await kc(cluster, kubectl, "get", "lease", "gw-a", "-o", "json")
    lease = json.loads(out.stdout)
    assert lease["apiVersion"] == "coordination.k8s.io/v1" and lease["kind"] == "Lease"
    assert lease["spec"]["renewTime"] == "2026-01-02T03:04:05.123456Z"

    wide = await kc(cluster, kubectl, "get", "leases", "-A", "--no-headers")
    assert wide.stdout.decode().split()[:3] == ["default", "gw-a", "gw-a_1234"]

    deleted = await kc(cluster, kubectl, "delete", "lease", "gw-a")
    assert deleted.stdout.decode().strip() == 'lease.coordination.k8s.io "gw-a" deleted'
    missing = await kc(cluster, kubectl, "get", "lease", "gw-a", check=False)
    assert missing.returncode == 1
    assert b'leases.coordination.k8s.io "gw-a" not found' in missing.stderr


async def test_kubectl_shows_validation_and_conflict_errors(
        cluster: EmbeddedCluster, kubectl: str) -> None:
    bad = LEASE_YAML.replace(b"leaseDurationSeconds: 30", b"leaseDurationSeconds: 0")
    result = await kc(cluster, kubectl, "create", *NO_OPENAPI, stdin=bad, check=False)
    assert result.returncode == 1
    assert result.stderr == (b'The Lease "gw-a" is invalid: spec.leaseDurationSeconds: '
                             b"Invalid value: 0: must be greater than 0\n")

    await kc(cluster, kubectl, "create", *NO_OPENAPI, stdin=LEASE_YAML)
    again = await kc(cluster, kubectl, "create", *NO_OPENAPI, stdin=LEASE_YAML, check=False)
    assert b'leases.coordination.k8s.io "gw-a" already exists' in again.stderr
    stale = LEASE_YAML.replace(b"  name: gw-a\n", b"  name: gw-a\n  resourceVersion: \"1\"\n")
    result = await kc(cluster, kubectl, "replace", *NO_OPENAPI, stdin=stale, check=False)
    assert result.returncode == 1
    assert (b'Operation cannot be fulfilled on leases.coordination.k8s.io "gw-a": the object '
            b"has been modified") in result.stderr


async def test_kubectl_watch_prints_holder_changes(
        cluster: EmbeddedCluster, kubectl: str) -> None:
    cluster.store.create_lease("default", lease_body("w", holder="first"))
    argv = [kubectl, "--kubeconfig", str(cluster.kubeconfig_path), "get", "leases", "-w",
            "--no-headers"]
    lines: list[str] = []
    async with trio.open_nursery() as nursery:
        process = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE)
        assert process.stdout is not None

        async def read() -> None:
            assert process.stdout is not None
            buf = b""
            async for chunk in process.stdout:
                buf += chunk
                *done, buf = buf.split(b"\n")
                lines.extend(d.decode() for d in done)

        nursery.start_soon(read)
        with trio.fail_after(20):
            while not lines:
                await trio.sleep(0.05)
            lease = cluster.store.get_lease("default", "w")
            lease["spec"]["holderIdentity"] = "second"
            cluster.store.update_lease("default", "w", lease)
            while not any("second" in line for line in lines):
                await trio.sleep(0.05)
        process.kill()
        await process.wait()
        nursery.cancel_scope.cancel()
    assert lines[0].split()[:2] == ["w", "first"]
    assert any(line.split()[:2] == ["w", "second"] for line in lines)


# -- the store's rules --------------------------------------------------------------------------


def test_update_needs_the_current_resource_version() -> None:
    store = Store()
    created = store.create_lease("default", lease_body("l"))
    assert created["metadata"]["resourceVersion"]
    renewed = dict(created, spec={**created["spec"], "renewTime": now()})
    updated, was_created = store.update_lease("default", "l", renewed)
    assert not was_created
    assert int(updated["metadata"]["resourceVersion"]) > int(created["metadata"]["resourceVersion"])
    with pytest.raises(Exception) as stale:
        store.update_lease("default", "l", renewed)  # created's resourceVersion again
    assert stale.value.status == {  # type: ignore[attr-defined]
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": 'Operation cannot be fulfilled on leases.coordination.k8s.io "l": the object '
                   "has been modified; please apply your changes to the latest version and try "
                   "again",
        "reason": "Conflict",
        "details": {"name": "l", "group": "coordination.k8s.io", "kind": "leases"},
        "code": 409}
    unconditional = {**renewed, "metadata": {"name": "l"}}
    with pytest.raises(Exception) as no_rv:
        store.update_lease("default", "l", unconditional)
    assert no_rv.value.code == 422  # type: ignore[attr-defined]
    assert "metadata.resourceVersion: Invalid value: 0: must be specified for an update" in str(
        no_rv.value)


@pytest.mark.parametrize(("spec", "message"), [
    ({"renewTime": "2026-01-02T03:04:05Z"},
     'parsing time "2026-01-02T03:04:05Z" as "2006-01-02T15:04:05.000000Z07:00"'),
    ({"leaseDurationSeconds": "30"}, "cannot unmarshal string into Go struct field "
     "LeaseSpec.spec.leaseDurationSeconds of type int32"),
])
def test_malformed_fields_are_bad_requests(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(Exception) as bad:
        Store().create_lease("default", lease_body("m", **spec))
    assert bad.value.code == 400  # type: ignore[attr-defined]
    assert message in bad.value.status["message"]  # type: ignore[attr-defined]


# -- kubernetes-asyncio ---------------------------------------------------------------------------


async def with_coordination(cluster: EmbeddedCluster,
                            fn: Callable[[client.CoordinationV1Api], Awaitable[Any]]) -> Any:
    async def inner() -> Any:
        cfg = client.Configuration()
        await config.load_kube_config(config_file=str(cluster.kubeconfig_path),
                                      client_configuration=cfg)
        async with client.ApiClient(cfg) as api_client:
            return await fn(client.CoordinationV1Api(api_client))

    return await trio_asyncio.aio_as_trio(inner)()


async def test_kubernetes_asyncio_lease_lifecycle(cluster: EmbeddedCluster,
                                                  aio_loop: None) -> None:
    async def run(api: client.CoordinationV1Api) -> dict[str, Any]:
        created = await api.create_namespaced_lease("default", lease_body("k"))
        assert created.spec.holder_identity == "me"
        assert created.spec.lease_duration_seconds == 30
        got = await api.read_namespaced_lease("k", "default")
        got.spec.renew_time = datetime.datetime.now(datetime.UTC).replace(microsecond=1)
        renewed = await api.replace_namespaced_lease("k", "default", got)
        assert renewed.metadata.resource_version != got.metadata.resource_version
        try:
            await api.replace_namespaced_lease("k", "default", got)  # stale
        except ApiException as exc:
            conflict = (exc.status, json.loads(exc.body)["reason"])
        listed = await api.list_namespaced_lease("default", label_selector="app=kuberun")
        events = []
        async with watch.Watch() as w:
            async for event in w.stream(api.list_namespaced_lease, "default",
                                        resource_version=created.metadata.resource_version,
                                        timeout_seconds=5):
                events.append((event["type"], event["object"].spec.holder_identity))
                w.stop()
        status = await api.delete_namespaced_lease("k", "default")
        try:
            await api.read_namespaced_lease("k", "default")
        except ApiException as exc:
            missing = exc.status
        return {"conflict": conflict, "listed": [i.metadata.name for i in listed.items],
                "events": events, "deleted": (status.status, status.details.kind),
                "missing": missing}

    result = await with_coordination(cluster, run)
    assert result == {"conflict": (409, "Conflict"), "listed": ["k"],
                      "events": [("MODIFIED", "me")], "deleted": ("Success", "leases"),
                      "missing": 404}
