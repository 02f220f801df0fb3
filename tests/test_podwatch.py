"""kuberun_trio.gateway.podwatch: one shared pod watch serving many waiters.

Everything runs against a real embedded cluster; the client's statistics and the
cluster's faults show that one watch serves all waiters, and that it survives dropped
streams and 410 Expired while pods are being waited for.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from kuberun_trio.aio.bridge import open_aio_loop
from kuberun_trio.aio.kube import KubeClient, open_kube_client
from kuberun_trio.cluster import EmbeddedCluster
from kuberun_trio.core.config import parse_config
from kuberun_trio.core.podstate import PodLoss, pod_ready
from kuberun_trio.core.podtemplate import (
    LABEL_INSTANCE,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    label_selector_for_instance,
)
from kuberun_trio.errors import PodStartError
from kuberun_trio.gateway.podwatch import PodWatchHub

NS = "default"
INSTANCE = "hub-test"


@pytest.fixture
async def kube(cluster: EmbeddedCluster) -> AsyncIterator[KubeClient]:
    config = parse_config({"connection": {"kubeconfig": str(cluster.kubeconfig_path)}})
    async with open_aio_loop(), open_kube_client(config) as kc:
        yield kc


@pytest.fixture
async def hub(kube: KubeClient) -> AsyncIterator[PodWatchHub]:
    async with trio.open_nursery() as nursery:
        yield await nursery.start(PodWatchHub(kube, label_selector_for_instance(INSTANCE)).run)
        nursery.cancel_scope.cancel()


def pod_body(name: str, image: str = "busybox", instance: str = INSTANCE) -> dict[str, Any]:
    return {"metadata": {"name": name,
                         "labels": {LABEL_MANAGED_BY: MANAGED_BY, LABEL_INSTANCE: instance}},
            "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 1,
                     "containers": [{"name": "c", "image": image,
                                     "command": ["sleep", "3600"]}]}}


async def create(kube: KubeClient, image: str = "busybox", instance: str = INSTANCE) -> str:
    name = f"hub-{uuid.uuid4().hex[:8]}"
    await kube.create_pod(NS, pod_body(name, image, instance))
    return name


async def wait_until(predicate: Any) -> None:
    with trio.fail_after(10):
        while not predicate():
            await trio.sleep(0.02)


async def test_many_waiters_share_one_watch(kube: KubeClient, hub: PodWatchHub) -> None:
    names = [await create(kube) for _ in range(12)]
    ready: dict[str, dict[str, Any]] = {}

    async def wait(name: str) -> None:
        ready[name] = await hub.wait_ready(NS, name)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(wait, name)
    assert sorted(ready) == sorted(names)
    assert all(pod_ready(pod) and pod["metadata"]["name"] == name
               for name, pod in ready.items())
    assert kube.statistics().watches_opened == 1


async def test_losses_are_judged_like_per_pod_watches(
        cluster: EmbeddedCluster, kube: KubeClient, hub: PodWatchHub) -> None:
    killed, evicted, deleted = [await create(kube) for _ in range(3)]
    for name in (killed, evicted, deleted):
        with trio.fail_after(20):
            await hub.wait_ready(NS, name)
    losses: dict[str, PodLoss] = {}

    async def watch(name: str) -> None:
        losses[name] = await hub.wait_lost(NS, name, "c")

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for name in (killed, evicted, deleted):
                nursery.start_soon(watch, name)
            await trio.sleep(0.3)
            assert losses == {}
            await cluster.faults.kill(NS, killed)
            await cluster.faults.evict(NS, evicted)
            await kube.delete_pod(NS, deleted, grace_period_seconds=5)
    assert losses[killed].reason in ("ContainerStopped", "Failed")
    assert "137" in losses[killed].message
    assert losses[evicted].reason == "Evicted"
    assert losses[deleted].reason == "Terminating"
    assert kube.statistics().watches_opened == 1


async def test_start_failure_reason(cluster: EmbeddedCluster, kube: KubeClient,
                                    hub: PodWatchHub) -> None:
    cluster.faults.fail_image("registry.invalid/*")
    name = await create(kube, image="registry.invalid/nope:1")
    with trio.fail_after(20), pytest.raises(PodStartError) as info:
        await hub.wait_ready(NS, name)
    assert info.value.reason in ("ErrImagePull", "ImagePullBackOff")
    assert info.value.pod == name
    await kube.delete_pod(NS, name, grace_period_seconds=0)


@pytest.mark.parametrize("fault", ["drop_watches", "expire_watches"])
async def test_waiters_survive_dropped_and_expired_watch(
        cluster: EmbeddedCluster, kube: KubeClient, hub: PodWatchHub, fault: str) -> None:
    cluster.faults.delay_start(1.5, "slow*")
    names = [await create(kube, image="slow:1") for _ in range(4)]
    ready: list[dict[str, Any]] = []

    async def wait(name: str) -> None:
        ready.append(await hub.wait_ready(NS, name))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(wait, name)
            await wait_until(lambda: kube.statistics().watches_opened >= 1)
            getattr(cluster.faults, fault)()
            await wait_until(lambda: kube.statistics().watches_opened >= 2)
            assert ready == []  # still starting: the events came on the resumed watch
    assert sorted(p["metadata"]["name"] for p in ready) == sorted(names)
    stats = kube.statistics()
    assert stats.watch_resumes >= 1
    if fault == "expire_watches":
        assert stats.relists >= 1
    # the resumed watch still delivers: a loss after the fault is seen
    async with trio.open_nursery() as nursery:
        losses: list[PodLoss] = []

        async def lost() -> None:
            losses.append(await hub.wait_lost(NS, names[0]))

        nursery.start_soon(lost)
        await trio.sleep(0.1)
        await kube.delete_pod(NS, names[0], grace_period_seconds=0)
    assert losses[0].reason in ("Terminating", "Deleted")


async def test_pod_the_hub_never_sees_is_read_with_get(kube: KubeClient) -> None:
    """The create's answer can beat the watch event: a waiter whose pod the hub has not
    seen reads it itself after ``get_fallback`` (here: a pod of another instance, which
    the hub's watch never delivers)."""
    async with trio.open_nursery() as nursery:
        hub = await nursery.start(PodWatchHub(kube, label_selector_for_instance(INSTANCE),
                                              get_fallback=0.2).run)
        other = await create(kube, instance="someone-else")
        with trio.fail_after(20):
            while True:  # each fallback reads once; wait again until Ready
                with trio.move_on_after(1):
                    pod = await hub.wait_ready(NS, other)
                    break
        assert pod_ready(pod)
        await kube.delete_pod(NS, other, grace_period_seconds=0)
        with trio.fail_after(10):
            while True:
                with trio.move_on_after(1):
                    loss = await hub.wait_lost(NS, other)
                    break
        assert loss.reason in ("Deleted", "Terminating")
        gone = f"hub-{uuid.uuid4().hex[:8]}"
        with trio.fail_after(5), pytest.raises(PodStartError) as info:
            await hub.wait_ready(NS, gone)
        assert info.value.reason == "PodDeleted"
        nursery.cancel_scope.cancel()


async def test_pod_created_before_the_hub_ran(kube: KubeClient) -> None:
    """Pods that exist before the hub's first list are known from that list."""
    names = [await create(kube) for _ in range(3)]
    async with trio.open_nursery() as nursery:
        hub = await nursery.start(PodWatchHub(kube, label_selector_for_instance(INSTANCE),
                                              get_fallback=math.inf).run)
        with trio.fail_after(20):
            for name in names:
                assert pod_ready(await hub.wait_ready(NS, name))
        nursery.cancel_scope.cancel()
