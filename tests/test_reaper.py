"""The Lease keeper and the reaper's sweeps, in-process against the embedded cluster."""

from __future__ import annotations

import datetime
import socket
from collections.abc import AsyncIterator
from typing import Any

import asyncssh
import pytest
import trio
import trio_asyncio

from kuberun_trio.aio.bridge import open_aio_loop
from kuberun_trio.aio.kube import KubeClient, open_kube_client
from kuberun_trio.cluster import EmbeddedCluster
from kuberun_trio.core.auth import PublicKeyAuthenticator
from kuberun_trio.core.config import KubernetesConfig, parse_config
from kuberun_trio.core.podtemplate import build_pod
from kuberun_trio.errors import KuberunError
from kuberun_trio.gateway.lease import (
    ANNOTATION_HOLDER,
    ANNOTATION_LEASE,
    LeaseHeldError,
    LeaseKeeper,
    LeaseOptions,
    default_instance,
    format_micro_time,
    holder_identity,
    lease_name,
    view,
)
from kuberun_trio.gateway.reaper import GcOptions, Reaper, ReaperStatistics
from kuberun_trio.gateway.serve import GatewayOptions, open_gateway

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def kube_config(cluster: EmbeddedCluster) -> KubernetesConfig:
    return parse_config({"connection": {"kubeconfig": str(cluster.kubeconfig_path)},
                         "timeouts": {"podStart": "20s", "podStop": "5s", "http": "2s"}})


@pytest.fixture
async def kube(cluster: EmbeddedCluster) -> AsyncIterator[KubeClient]:
    async with open_aio_loop(), open_kube_client(kube_config(cluster)) as client:
        yield client


async def make_pod(kube: KubeClient, instance: str, cid: str,
                   annotations: dict[str, str]) -> str:
    config = parse_config({"pod": {"metadata": {"namespace": "default", "generateName": "p-",
                                                "annotations": annotations}}})
    body = build_pod(config, connection_id=cid, username="u", client_address="10.0.0.1:1",
                     instance=instance, auth_metadata={}, auth_env={})
    created = await kube.create_pod("default", body)
    return str(created["metadata"]["name"])


def live(cluster: EmbeddedCluster) -> set[str]:
    return {p["metadata"]["name"] for p in cluster.pods()
            if not p["metadata"].get("deletionTimestamp")}


def options(**kw: Any) -> LeaseOptions:
    return LeaseOptions(namespace="default", **{"duration": 3.0, "renew_interval": 1.0, **kw})


# -- identity --------------------------------------------------------------------------------


def test_identity_defaults() -> None:
    cluster_env = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "POD_NAME": "gw-7d9f-x2",
                   "POD_UID": "1234-abcd"}
    assert default_instance(cluster_env) == "gw-7d9f-x2"
    assert default_instance({"POD_NAME": "gw-x"}) == socket.gethostname()  # not in a cluster
    assert holder_identity("gw-7d9f-x2", cluster_env) == "gw-7d9f-x2_1234-abcd"
    assert holder_identity("h", {}) != holder_identity("h", {})  # unique per process
    assert lease_name("gw-a") == "kuberun-gw-a"
    odd = lease_name("Host_Name.EXAMPLE")
    assert odd.startswith("kuberun-host-name-example-") and len(odd) <= 63


def test_expiry_judgement() -> None:
    now = datetime.datetime(2026, 1, 1, 12, 0, 0, tzinfo=datetime.UTC)
    lease = {"metadata": {"name": "kuberun-a", "namespace": "default", "resourceVersion": "7"},
             "spec": {"holderIdentity": "a_1", "leaseDurationSeconds": 30,
                      "renewTime": format_micro_time(now - datetime.timedelta(seconds=20))}}
    seen = view(lease)
    assert not seen.expired(now)
    assert seen.expired(now + datetime.timedelta(seconds=11))
    assert not seen.expired(now + datetime.timedelta(seconds=11), margin=5)
    assert view({**lease, "spec": {**lease["spec"], "holderIdentity": ""}}).expired(now)
    assert seen.describe(now) == "holder a_1, renewed 20s ago, expires in 10s"


# -- the keeper --------------------------------------------------------------------------------


async def test_one_holder_per_instance_takeover_after_expiry_and_release(
        cluster: EmbeddedCluster, kube: KubeClient) -> None:
    first = LeaseKeeper(kube, options(holder="first"), "gw")
    await first.acquire()
    stored = cluster.store.get_lease("default", "kuberun-gw")
    assert stored["spec"]["holderIdentity"] == "first"
    assert stored["spec"]["leaseDurationSeconds"] == 3
    assert stored["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "kuberun-trio",
                                            "kuberun.trio/instance": "gw"}
    second = LeaseKeeper(kube, options(holder="second"), "gw")
    with pytest.raises(LeaseHeldError, match="another gateway holds instance 'gw'"):
        await second.acquire()
    await first.renew()
    renewed = cluster.store.get_lease("default", "kuberun-gw")
    assert renewed["spec"]["acquireTime"] == stored["spec"]["acquireTime"]
    assert renewed["spec"]["renewTime"] > stored["spec"]["renewTime"]
    # the first holder dies (stops renewing): once expired, the second takes over
    await trio.sleep(3.2)
    await second.acquire()
    taken = cluster.store.get_lease("default", "kuberun-gw")
    assert (taken["spec"]["holderIdentity"], taken["spec"]["leaseTransitions"]) == ("second", 1)
    # the first notices on its next renewal: a 409, and another holder
    lost: list[str] = []
    first.on_lost = lost.append
    with pytest.raises(Exception, match="Conflict"):
        await first.renew()
    assert lost == ["taken over by second"] and not first.held
    await first.release()  # not ours any more: stays
    assert cluster.store.get_lease("default", "kuberun-gw")["spec"]["holderIdentity"] == "second"
    await second.release()
    assert cluster.store.list("leases", "default")["items"] == []


async def test_gateway_stops_accepting_while_the_lease_cannot_be_renewed(
        cluster: EmbeddedCluster, kube: KubeClient) -> None:
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    gateway_options = GatewayOptions(
        kubernetes=kube_config(cluster),
        authenticator=PublicKeyAuthenticator([client_key.export_public_key("openssh").decode()]),
        host_keys=(host_key.export_private_key("openssh"),), port=0, instance="gw-renew",
        lease=options(duration=2.0, renew_interval=0.5))

    async def connect(port: int) -> bool:
        async def go() -> bool:
            try:
                conn = await asyncssh.connect("127.0.0.1", port, username="alice",
                                              client_keys=[client_key], known_hosts=None)
            except OSError:
                return False
            conn.close()
            return True

        result: bool = await trio_asyncio.aio_as_trio(go)()
        return result

    async with open_gateway(gateway_options) as gateway:
        port = gateway.address[1]
        assert gateway.accepting and gateway.lease is not None and gateway.lease.held
        assert await connect(port)
        cluster.faults.fail_requests("update", "leases", 1000, code=503)
        with trio.fail_after(10):
            while gateway.accepting:
                await trio.sleep(0.05)
        assert not gateway.lease.held
        assert not await connect(port)
        # The Lease expired meanwhile, but nobody else took it: renewals work again.
        cluster.faults.clear_request_failures()
        with trio.fail_after(10):
            while not gateway.accepting:
                await trio.sleep(0.05)
        assert gateway.address[1] == port and gateway.lease.held
        assert await connect(port)
    assert cluster.store.list("leases", "default")["items"] == []


# -- sweeps ------------------------------------------------------------------------------------


async def test_own_sweep_deletes_only_this_process_unowned_pods(
        cluster: EmbeddedCluster, kube: KubeClient) -> None:
    mine = {ANNOTATION_HOLDER: "gw_me"}
    owned = await make_pod(kube, "gw", "live1", mine)
    orphan = await make_pod(kube, "gw", "gone1", mine)
    namesake = await make_pod(kube, "gw", "other1", {ANNOTATION_HOLDER: "gw_other"})
    stranger = await make_pod(kube, "gw2", "gone2", {ANNOTATION_HOLDER: "gw_me"})
    reaper = Reaper(kube, namespace="default", instance="gw", holder="gw_me",
                    options=GcOptions(), live_connections=lambda: ["live1"])
    assert await reaper.sweep() == 1
    assert live(cluster) == {owned, namesake, stranger}
    assert reaper.orphan_pods_deleted == 1 and orphan not in live(cluster)
    assert reaper.statistics() == ReaperStatistics(orphan_pods_deleted=1, pods_reaped=0,
                                                   pending=0, sweeps=1)


async def test_cross_sweep_follows_the_leases(cluster: EmbeddedCluster,
                                              kube: KubeClient) -> None:
    keeper = LeaseKeeper(kube, options(holder="me"), "gw-me")
    await keeper.acquire()
    live_peer = LeaseKeeper(kube, options(holder="peer", duration=30.0), "gw-peer")
    await live_peer.acquire()
    now = datetime.datetime.now(datetime.UTC)
    cluster.store.create_lease("default", {"metadata": {
        "name": "kuberun-gw-dead", "labels": {"app.kubernetes.io/managed-by": "kuberun-trio",
                                              "kuberun.trio/instance": "gw-dead"}},
        "spec": {"holderIdentity": "dead", "leaseDurationSeconds": 1,
                 "renewTime": format_micro_time(now - datetime.timedelta(seconds=60))}})
    cluster.store.create_lease("default", {"metadata": {
        "name": "kuberun-gw-long-gone", "labels": {
            "app.kubernetes.io/managed-by": "kuberun-trio",
            "kuberun.trio/instance": "gw-long-gone"}},
        "spec": {"holderIdentity": "x", "leaseDurationSeconds": 1,
                 "renewTime": format_micro_time(now - datetime.timedelta(seconds=600))}})
    peer_pod = await make_pod(kube, "gw-peer", "c1", {ANNOTATION_LEASE: live_peer.ref})
    dead_pod = await make_pod(kube, "gw-dead", "c2", {ANNOTATION_LEASE: "default/kuberun-gw-dead"})
    vanished_pod = await make_pod(kube, "gw-vanished", "c3",
                                  {ANNOTATION_LEASE: "default/kuberun-gw-vanished"})
    no_lease_pod = await make_pod(kube, "gw-old", "c4", {})
    options_ = GcOptions(margin=0.0)
    reaper = Reaper(kube, namespace="default", instance="gw-me", holder="me", options=options_,
                    live_connections=list, keeper=keeper)
    keeper.held = False  # a gateway without a valid Lease judges nobody
    assert await reaper.sweep() == 0
    keeper.held = True
    assert await reaper.sweep() == 2
    assert live(cluster) == {peer_pod, no_lease_pod}
    assert dead_pod not in live(cluster) and vanished_pod not in live(cluster)
    assert reaper.orphan_pods_deleted == 2
    # the long-expired Lease named by no pod is gone; the dead one still named by its
    # (now deleting) pod, the live ones and our own stay until a later sweep
    leases = cluster.store.list("leases", "default")["items"]
    names = {lease["metadata"]["name"] for lease in leases}
    assert names == {"kuberun-gw-me", "kuberun-gw-peer", "kuberun-gw-dead"}


async def test_failed_delete_is_retried_until_it_succeeds(
        cluster: EmbeddedCluster, kube: KubeClient) -> None:
    pod = await make_pod(kube, "gw", "c1", {})
    reaper = Reaper(kube, namespace="default", instance="gw", holder="gw_me",
                    options=GcOptions(retry_base=0.1, retry_max=0.4, sweep_interval=3600),
                    live_connections=list, delete_timeout=5)
    cluster.faults.fail_requests("delete", "pods", 12, code=500)  # 2 tries of 5 attempts + 2
    async with trio.open_nursery() as nursery:
        await nursery.start(reaper.run)
        reaper.submit("default", pod, "c1")
        with trio.fail_after(20):
            while reaper.pending:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert pod not in live(cluster) and reaper.pods_reaped == 1


async def test_lease_namespace_missing_is_a_clear_error(kube: KubeClient) -> None:
    keeper = LeaseKeeper(kube, LeaseOptions(namespace="no-such-ns"), "gw")
    with pytest.raises(KuberunError, match=r"cannot create Lease no-such-ns/kuberun-gw: .*"
                                           r"create the namespace or set lease.namespace"):
        await keeper.acquire()
