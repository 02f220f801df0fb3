"""The embedded cluster's Status bodies, pod defaulting/validation and object store."""

from __future__ import annotations

import datetime
import json
import re
from typing import Any

import pytest
import trio
import trio.testing

from kuberun_trio.cluster import podspec, status
from kuberun_trio.cluster.store import Store

# -- status.py: the exact bytes of notes §3.6 ------------------------------------


def test_status_bodies_byte_for_byte() -> None:
    cases = [
        (
            status.not_found("pods", "p"),
            404,
            '{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":'
            '"pods \\"p\\" not found","reason":"NotFound","details":{"name":"p","kind":"pods"},'
            '"code":404}',
        ),
        (
            status.already_exists("pods", "p"),
            409,
            '{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":'
            '"pods \\"p\\" already exists","reason":"AlreadyExists","details":{"name":"p",'
            '"kind":"pods"},"code":409}',
        ),
        (
            status.conflict("pods", "p"),
            409,
            '{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":'
            '"Operation cannot be fulfilled on pods \\"p\\": the object has been modified; please '
            'apply your changes to the latest version and try again","reason":"Conflict",'
            '"details":{"name":"p","kind":"pods"},"code":409}',
        ),
        (
            status.invalid("Pod", "p", [status.required("spec.containers")]),
            422,
            '{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":'
            '"Pod \\"p\\" is invalid: spec.containers: Required value","reason":"Invalid",'
            '"details":{"name":"p","kind":"Pod","causes":[{"reason":"FieldValueRequired",'
            '"message":"Required value","field":"spec.containers"}]},"code":422}',
        ),
        (
            status.forbidden(
                "pods",
                "p",
                user="system:serviceaccount:gw:gw",
                verb="create",
                namespace="ns",
                subresource="exec",
            ),
            403,
            '{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":'
            '"pods \\"p\\" is forbidden: User \\"system:serviceaccount:gw:gw\\" cannot create '
            'resource \\"pods/exec\\" in API group \\"\\" in the namespace \\"ns\\"","reason":'
            '"Forbidden","details":{"name":"p","kind":"pods"},"code":403}',
        ),
        (
            status.bad_request("container c is not valid for pod p"),
            400,
            '{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":'
            '"container c is not valid for pod p","reason":"BadRequest","code":400}',
        ),
        (
            status.unauthorized(),
            401,
            '{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":'
            '"Unauthorized","reason":"Unauthorized","code":401}',
        ),
        (
            status.namespace_not_found("foo"),
            404,
            '{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":'
            '"namespaces \\"foo\\" not found","reason":"NotFound","details":{"name":"foo",'
            '"kind":"namespaces"},"code":404}',
        ),
        (
            status.path_not_found(),
            404,
            '{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":'
            '"the server could not find the requested resource","reason":"NotFound",'
            '"details":{},"code":404}',
        ),
    ]
    for err, code, body in cases:
        assert (err.code, err.content_type) == (code, "application/json")
        assert err.body.decode() == body


def test_status_list_forbidden_plain_and_expired() -> None:
    err = status.forbidden("pods", None, user="u", verb="list", namespace="ns")
    body = json.loads(err.body)
    assert body["message"] == (
        'pods is forbidden: User "u" cannot list resource "pods" in API group "" '
        'in the namespace "ns"'
    )
    assert body["details"] == {"kind": "pods"}
    text = status.plain(500, 'container not found ("c")')
    assert (text.code, text.body, text.content_type) == (
        500,
        b'container not found ("c")',
        "text/plain; charset=utf-8",
    )
    assert list(status.expired_status("too old resource version: 5 (120)")) == [
        "kind",
        "apiVersion",
        "metadata",
        "status",
        "message",
        "reason",
        "code",
    ]
    assert status.method_not_allowed().code == 405


def test_invalid_joins_several_causes_like_an_aggregate() -> None:
    err = status.invalid(
        "Pod",
        "p",
        [
            status.required("spec.containers[0].name"),
            status.required("spec.containers[0].image"),
            status.required("spec.containers[0].image"),
        ],
    )
    message = json.loads(err.body)["message"]
    assert message == (
        'Pod "p" is invalid: [spec.containers[0].name: Required value, '
        "spec.containers[0].image: Required value]"
    )


# -- podspec.py -------------------------------------------------------------------


def _pod(name: str = "p", **spec: Any) -> dict[str, Any]:
    containers = spec.pop("containers", [{"name": "c", "image": "busybox"}])
    return {
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"containers": containers, **spec},
    }


def test_defaults_match_the_real_server() -> None:
    pod = podspec.prepare_pod(_pod(containers=[{"name": "c", "image": "busybox:1.36"}]))
    spec = pod["spec"]
    assert spec["restartPolicy"] == "Always"
    assert spec["terminationGracePeriodSeconds"] == 30
    assert spec["dnsPolicy"] == "ClusterFirst"
    assert spec["schedulerName"] == "default-scheduler"
    assert spec["securityContext"] == {}
    assert spec["enableServiceLinks"] is True
    assert spec["serviceAccountName"] == spec["serviceAccount"] == "default"
    assert (spec["priority"], spec["preemptionPolicy"]) == (0, "PreemptLowerPriority")
    assert spec["tolerations"] == [
        {
            "key": f"node.kubernetes.io/{k}",
            "operator": "Exists",
            "effect": "NoExecute",
            "tolerationSeconds": 300,
        }
        for k in ("not-ready", "unreachable")
    ]
    (volume,) = spec["volumes"]
    assert re.fullmatch(r"kube-api-access-[bcdfghjklmnpqrstvwxz2456789]{5}", volume["name"])
    assert volume["projected"]["defaultMode"] == 420
    (ctr,) = spec["containers"]
    assert ctr["imagePullPolicy"] == "IfNotPresent"
    assert ctr["terminationMessagePath"] == "/dev/termination-log"
    assert ctr["terminationMessagePolicy"] == "File"
    assert ctr["resources"] == {}
    assert ctr["volumeMounts"] == [
        {
            "name": volume["name"],
            "readOnly": True,
            "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
        }
    ]
    assert list(spec)[:3] == ["volumes", "containers", "restartPolicy"]


@pytest.mark.parametrize(
    ("image", "policy"),
    [
        ("busybox", "Always"),
        ("busybox:latest", "Always"),
        ("busybox:1.36", "IfNotPresent"),
        ("localhost:5000/busybox", "Always"),
        ("localhost:5000/busybox:2", "IfNotPresent"),
        ("busybox@sha256:abcd", "IfNotPresent"),
    ],
)
def test_image_pull_policy_default(image: str, policy: str) -> None:
    assert podspec.pull_policy(image) == policy


def test_no_token_volume_when_automount_is_off_and_tolerations_not_duplicated() -> None:
    pod = podspec.prepare_pod(
        _pod(
            automountServiceAccountToken=False,
            tolerations=[
                {
                    "key": "node.kubernetes.io/unreachable",
                    "operator": "Exists",
                    "effect": "NoExecute",
                    "tolerationSeconds": 5,
                }
            ],
        )
    )
    assert "volumes" not in pod["spec"]
    assert "volumeMounts" not in pod["spec"]["containers"][0]
    keys = [(t["key"], t["tolerationSeconds"]) for t in pod["spec"]["tolerations"]]
    assert keys == [("node.kubernetes.io/unreachable", 5), ("node.kubernetes.io/not-ready", 300)]


def _causes(body: dict[str, Any]) -> list[tuple[str, str, str]]:
    with pytest.raises(status.ApiStatusError) as info:
        podspec.prepare_pod(body)
    assert info.value.code == 422
    details = json.loads(info.value.body)["details"]
    assert details["kind"] == "Pod"
    return [(c["field"], c["reason"], c["message"]) for c in details["causes"]]


def test_validation_messages() -> None:
    assert _causes(_pod(containers=[])) == [
        ("spec.containers", "FieldValueRequired", "Required value")
    ]
    causes = _causes(_pod(containers=[{"name": "Web_1", "image": ""}, {"name": "", "image": "x"}]))
    assert causes[0] == (
        "spec.containers[0].name",
        "FieldValueInvalid",
        'Invalid value: "Web_1": a lowercase RFC 1123 label must consist of lower case '
        "alphanumeric characters or '-', and must start and end with an alphanumeric character "
        "(e.g. 'my-name',  or '123-abc', regex used for validation is "
        "'[a-z0-9]([-a-z0-9]*[a-z0-9])?')",
    )
    assert causes[1:] == [
        ("spec.containers[0].image", "FieldValueRequired", "Required value"),
        ("spec.containers[1].name", "FieldValueRequired", "Required value"),
    ]
    dup = _causes(_pod(containers=[{"name": "c", "image": "x"}, {"name": "c", "image": "x"}]))
    assert dup == [("spec.containers[1].name", "FieldValueDuplicate", 'Duplicate value: "c"')]
    bad_policy = _causes(_pod(restartPolicy="Sometimes"))
    assert bad_policy == [
        (
            "spec.restartPolicy",
            "FieldValueNotSupported",
            'Unsupported value: "Sometimes": supported values: "Always", "OnFailure", "Never"',
        )
    ]


def test_name_and_label_validation() -> None:
    body = _pod()
    body["metadata"] = {"namespace": "default"}
    assert _causes(body) == [
        ("metadata.name", "FieldValueRequired", "Required value: name or generateName is required")
    ]
    body["metadata"] = {
        "name": "p",
        "namespace": "default",
        "labels": {"bad key": "ok", "k": "bad value!"},
    }
    causes = _causes(body)
    assert [c[:2] for c in causes] == [("metadata.labels", "FieldValueInvalid")] * 2
    assert causes[0][2].startswith('Invalid value: "bad key": name part must consist of')
    assert causes[1][2].startswith(
        'Invalid value: "bad value!": a valid label must be an empty string or consist of'
    )


def test_undecodable_body_is_400() -> None:
    with pytest.raises(status.ApiStatusError) as info:
        podspec.prepare_pod({"metadata": {"name": "p"}, "spec": {"containers": "nope"}})
    assert info.value.code == 400
    assert json.loads(info.value.body)["message"].startswith(
        'Pod in version "v1" cannot be handled as a Pod: json: cannot unmarshal string'
    )


@pytest.mark.parametrize(
    ("resources", "qos"),
    [
        ([{}], "BestEffort"),
        ([{"requests": {"cpu": "100m"}}], "Burstable"),
        ([{"limits": {"cpu": "1", "memory": "1Gi"}}], "Guaranteed"),
        (
            [
                {
                    "limits": {"cpu": "1", "memory": "1Gi"},
                    "requests": {"cpu": "1000m", "memory": "1024Mi"},
                }
            ],
            "Guaranteed",
        ),
        ([{"limits": {"cpu": "1", "memory": "1Gi"}, "requests": {"cpu": "500m"}}], "Burstable"),
        ([{"limits": {"cpu": "1"}}], "Burstable"),
        ([{"limits": {"cpu": "1", "memory": "1G"}}, {}], "Burstable"),
        ([{"requests": {"ephemeral-storage": "1Gi"}}], "BestEffort"),
    ],
)
def test_qos_class(resources: list[dict[str, Any]], qos: str) -> None:
    containers = [{"name": f"c{i}", "image": "x", "resources": r} for i, r in enumerate(resources)]
    assert podspec.qos_class(podspec.prepare_pod(_pod(containers=containers))) == qos


# -- store: create / get / list ----------------------------------------------------


def test_namespaces_exist_and_can_be_created() -> None:
    store = Store()
    names = [n["metadata"]["name"] for n in store.list_namespaces()["items"]]
    assert names == ["default", "kube-node-lease", "kube-public", "kube-system"]
    ns = store.create_namespace({"metadata": {"name": "team-a"}})
    assert (ns["kind"], ns["status"], ns["spec"]) == (
        "Namespace",
        {"phase": "Active"},
        {"finalizers": ["kubernetes"]},
    )
    assert ns["metadata"]["labels"] == {"kubernetes.io/metadata.name": "team-a"}
    assert store.get_namespace("team-a")["metadata"]["uid"] == ns["metadata"]["uid"]
    with pytest.raises(status.ApiStatusError) as info:
        store.create_namespace({"metadata": {"name": "team-a"}})
    assert info.value.code == 409
    with pytest.raises(status.ApiStatusError) as info:
        store.create_namespace({"metadata": {"name": "Team.A"}})
    assert info.value.code == 422


def test_create_pod_assigns_system_fields() -> None:
    store = Store()
    rv0 = store.resource_version
    body = _pod(labels=None)
    body["metadata"]["uid"] = "client-uid"
    body["status"] = {"phase": "Running"}
    pod = store.create_pod("default", body, manager="kubectl-run")
    meta = pod["metadata"]
    assert (pod["kind"], pod["apiVersion"]) == ("Pod", "v1")
    assert meta["uid"] != "client-uid" and len(meta["uid"]) == 36
    assert meta["resourceVersion"] == str(rv0 + 1) == str(store.resource_version)
    assert meta["generation"] == 1
    created = datetime.datetime.strptime(meta["creationTimestamp"], "%Y-%m-%dT%H:%M:%SZ")
    now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    assert abs((now - created).total_seconds()) < 5
    assert meta["managedFields"][0]["manager"] == "kubectl-run"
    assert meta["managedFields"][0]["fieldsType"] == "FieldsV1"
    assert pod["status"] == {"phase": "Pending", "qosClass": "BestEffort"}
    assert store.get_pod("default", "p") == pod
    pod["metadata"]["name"] = "mutated"
    assert store.get_pod("default", "p")["metadata"]["name"] == "p"


def test_create_pod_errors() -> None:
    store = Store()
    store.create_pod("default", _pod())
    with pytest.raises(status.ApiStatusError) as info:
        store.create_pod("default", _pod())
    assert (info.value.code, json.loads(info.value.body)["reason"]) == (409, "AlreadyExists")
    with pytest.raises(status.ApiStatusError) as info:
        store.create_pod("nope", _pod())
    assert json.loads(info.value.body)["message"] == 'namespaces "nope" not found'
    with pytest.raises(status.ApiStatusError) as info:
        store.create_pod("kube-system", _pod("q"))
    assert info.value.code == 400
    with pytest.raises(status.ApiStatusError) as info:
        store.get_pod("default", "absent")
    assert info.value.code == 404


def test_generate_name() -> None:
    store = Store()
    body = _pod()
    body["metadata"] = {"generateName": "web-"}
    names = {store.create_pod("default", body)["metadata"]["name"] for _ in range(20)}
    assert len(names) == 20
    assert all(re.fullmatch(r"web-[bcdfghjklmnpqrstvwxz2456789]{5}", n) for n in names)


def test_list_with_selectors_limit_and_continue() -> None:
    store = Store()
    for i in range(5):
        body = _pod(f"p{i}")
        body["metadata"]["labels"] = {"app": "web" if i % 2 == 0 else "db"}
        store.create_pod("default", body)
    store.create_namespace({"metadata": {"name": "other"}})
    store.create_pod("other", {**_pod("x"), "metadata": {"name": "x"}})
    listing = store.list_pods("default")
    assert (listing["kind"], listing["apiVersion"]) == ("PodList", "v1")
    assert listing["metadata"] == {"resourceVersion": str(store.resource_version)}
    assert all("kind" not in item and "apiVersion" not in item for item in listing["items"])
    assert [p["metadata"]["name"] for p in store.list_pods(None)["items"]] == [
        "p0",
        "p1",
        "p2",
        "p3",
        "p4",
        "x",
    ]
    web = store.list_pods("default", "app=web")
    assert [p["metadata"]["name"] for p in web["items"]] == ["p0", "p2", "p4"]
    named = store.list_pods(None, "app notin (web)", "metadata.namespace=default")
    assert [p["metadata"]["name"] for p in named["items"]] == ["p1", "p3"]

    page = store.list_pods("default", limit=2)
    seen = [p["metadata"]["name"] for p in page["items"]]
    assert page["metadata"]["remainingItemCount"] == 3
    rv = page["metadata"]["resourceVersion"]
    while "continue" in page["metadata"]:
        page = store.list_pods("default", limit=2, continue_token=page["metadata"]["continue"])
        assert page["metadata"]["resourceVersion"] == rv
        seen += [p["metadata"]["name"] for p in page["items"]]
    assert seen == ["p0", "p1", "p2", "p3", "p4"]
    with pytest.raises(status.ApiStatusError) as info:
        store.list_pods("default", continue_token="garbage!")
    assert info.value.code == 400
    token = store.list_pods("default", limit=1)["metadata"]["continue"]
    store.expire_history()
    with pytest.raises(status.ApiStatusError) as info:
        store.list_pods("default", limit=1, continue_token=token)
    assert (info.value.code, json.loads(info.value.body)["reason"]) == (410, "Expired")


# -- store: update / delete ----------------------------------------------------------


def _schedule(store: Store, name: str = "p", ns: str = "default") -> None:
    def bind(pod: dict[str, Any]) -> None:
        pod["spec"]["nodeName"] = "node-1"
        pod["status"]["phase"] = "Running"

    store.update_pod(ns, name, bind)


def test_update_pod_bumps_rv_and_skips_noops() -> None:
    store = Store()
    store.create_pod("default", _pod())
    rv = store.resource_version
    same = store.update_pod("default", "p", lambda pod: None)
    assert store.resource_version == rv and same["metadata"]["resourceVersion"] == str(rv)
    pod = store.update_pod("default", "p", lambda p: p["status"].update(phase="Running"))
    assert pod["metadata"]["resourceVersion"] == str(rv + 1)
    assert pod["status"]["phase"] == "Running"
    entry = pod["metadata"]["managedFields"][-1]
    assert (entry["manager"], entry["subresource"]) == ("kubelet", "status")
    renamed = store.update_pod("default", "p", lambda p: p["metadata"].update(uid="x"))
    assert renamed["metadata"]["uid"] == pod["metadata"]["uid"]


def _rfc(text: str) -> datetime.datetime:
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)


def test_delete_unscheduled_pod_is_immediate() -> None:
    store = Store()
    store.create_pod("default", _pod())
    pod = store.delete_pod("default", "p", grace_period_seconds=30)
    assert "deletionTimestamp" not in pod["metadata"]
    with pytest.raises(status.ApiStatusError):
        store.get_pod("default", "p")


def test_graceful_delete_then_kubelet_removal() -> None:
    store = Store()
    store.create_pod("default", _pod())
    _schedule(store)
    before = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    pod = store.delete_pod("default", "p")
    meta = pod["metadata"]
    assert meta["deletionGracePeriodSeconds"] == 30
    assert meta["generation"] == 2
    delay = (_rfc(meta["deletionTimestamp"]) - before).total_seconds()
    assert 29 <= delay <= 32
    assert (
        store.get_pod("default", "p")["metadata"]["deletionTimestamp"] == meta["deletionTimestamp"]
    )
    # A longer grace is a no-op; a shorter one shortens.
    again = store.delete_pod("default", "p", grace_period_seconds=60)
    assert again["metadata"]["resourceVersion"] == meta["resourceVersion"]
    shorter = store.delete_pod("default", "p", grace_period_seconds=10)
    assert shorter["metadata"]["deletionGracePeriodSeconds"] == 10
    assert (_rfc(meta["deletionTimestamp"]) - _rfc(shorter["metadata"]["deletionTimestamp"])) == (
        datetime.timedelta(seconds=20)
    )
    store.remove_pod("default", "p")
    with pytest.raises(status.ApiStatusError) as info:
        store.get_pod("default", "p")
    assert info.value.code == 404


@pytest.mark.parametrize(("grace", "expected"), [(None, 30), (5, 5), (-3, 1), (0, None)])
def test_grace_period_rules(grace: int | None, expected: int | None) -> None:
    store = Store()
    store.create_pod("default", _pod())
    _schedule(store)
    pod = store.delete_pod("default", "p", grace_period_seconds=grace)
    if expected is None:
        assert store.list_pods("default")["items"] == []
        assert "deletionTimestamp" not in pod["metadata"]
    else:
        assert pod["metadata"]["deletionGracePeriodSeconds"] == expected


def test_terminal_pod_and_pending_force_delete_are_immediate() -> None:
    store = Store()
    store.create_pod("default", _pod())
    _schedule(store)
    store.update_pod("default", "p", lambda p: p["status"].update(phase="Succeeded"))
    store.delete_pod("default", "p")
    assert store.list_pods("default")["items"] == []
    store.create_pod("default", _pod())
    _schedule(store)
    store.delete_pod("default", "p")
    store.delete_pod("default", "p", grace_period_seconds=0)
    assert store.list_pods("default")["items"] == []


def test_finalizers_keep_the_pod_until_removed() -> None:
    store = Store()
    body = _pod()
    body["metadata"]["finalizers"] = ["example.com/hold"]
    store.create_pod("default", body)
    pod = store.delete_pod("default", "p")  # unscheduled: grace 0, but finalizer holds it
    assert pod["metadata"]["deletionGracePeriodSeconds"] == 0
    assert store.get_pod("default", "p")["metadata"]["deletionTimestamp"]
    store.remove_pod("default", "p")
    assert store.get_pod("default", "p")["metadata"]["finalizers"] == ["example.com/hold"]
    store.update_pod("default", "p", lambda p: p["metadata"].update(finalizers=[]))
    assert store.list_pods("default")["items"] == []


def test_delete_preconditions_and_propagation_policy() -> None:
    store = Store()
    store.create_pod("default", _pod())
    with pytest.raises(status.ApiStatusError) as info:
        store.delete_pod("default", "p", preconditions={"uid": "other"})
    assert info.value.code == 409
    with pytest.raises(status.ApiStatusError) as info:
        store.delete_pod("default", "p", propagation_policy="Sideways")
    assert info.value.code == 422
    store.delete_pod("default", "p", propagation_policy="Foreground")
    with pytest.raises(status.ApiStatusError):
        store.delete_pod("default", "p")


def test_events_are_recorded_deduplicated_and_selectable() -> None:
    store = Store()
    pod = store.create_pod("default", _pod())
    store.record_event(
        "default", pod, "Normal", "Scheduled", "assigned", component="default-scheduler"
    )
    store.record_event("default", pod, "Warning", "BackOff", "back-off", host="node-1")
    again = store.record_event("default", pod, "Warning", "BackOff", "back-off", host="node-1")
    assert again["count"] == 2
    assert again["source"] == {"component": "kubelet", "host": "node-1"}
    uid = pod["metadata"]["uid"]
    selector = (
        f"involvedObject.name=p,involvedObject.namespace=default,"
        f"involvedObject.kind=Pod,involvedObject.uid={uid}"
    )
    events = store.list_events("default", field_selector=selector)["items"]
    assert [e["reason"] for e in events] == ["Scheduled", "BackOff"]
    assert events[0]["metadata"]["name"].startswith("p.")
    assert store.list_events("default", field_selector="type=Warning")["items"][0]["count"] == 2
    assert store.list_events("default", field_selector="involvedObject.uid=x")["items"] == []


def test_event_count_is_bounded() -> None:
    store = Store(max_events=3)
    pod = store.create_pod("default", _pod())
    for i in range(6):
        store.record_event("default", pod, "Normal", "R", f"m{i}")
    assert [e["message"] for e in store.list_events(None)["items"]] == ["m3", "m4", "m5"]


def test_event_eviction_drops_the_least_recently_written() -> None:
    store = Store(max_events=3)
    pod = store.create_pod("default", _pod())
    for message in ("m0", "m1", "m2", "m0", "m3"):  # m0 happens again: it is newer than m1
        store.record_event("default", pod, "Normal", "R", message)
    kept = {e["message"]: e["count"] for e in store.list_events(None)["items"]}
    assert kept == {"m0": 2, "m2": 1, "m3": 1}


# -- store: watch -----------------------------------------------------------------


async def _collect(watch: Any, n: int) -> list[tuple[str, str, str]]:
    out = []
    async for event in watch:
        obj = event["object"]
        out.append((event["type"], obj["kind"], obj["metadata"].get("name", "")))
        if len(out) == n:
            break
    return out


async def test_watch_initial_then_live(autojump_clock: trio.testing.MockClock) -> None:
    store = Store()
    store.create_pod("default", _pod("a"))
    watch = store.watch_pods("default", resource_version="0", timeout_seconds=60)
    store.create_pod("default", _pod("b"))
    _schedule(store, "a")
    store.delete_pod("default", "b")
    assert await _collect(watch, 4) == [
        ("ADDED", "Pod", "a"),
        ("ADDED", "Pod", "b"),
        ("MODIFIED", "Pod", "a"),
        ("DELETED", "Pod", "b"),
    ]
    watch.close()


async def test_watch_resume_from_rv_and_410(autojump_clock: trio.testing.MockClock) -> None:
    store = Store(history_size=4)
    store.create_pod("default", _pod("a"))
    rv = str(store.resource_version)
    store.create_pod("default", _pod("b"))
    _schedule(store, "a")
    watch = store.watch_pods("default", resource_version=rv, timeout_seconds=60)
    events = []
    async for event in watch:
        events.append((event["type"], event["object"]["metadata"]["name"]))
        if len(events) == 2:
            break
    assert events == [("ADDED", "b"), ("MODIFIED", "a")]
    watch.close()
    for i in range(5):
        store.create_pod("default", _pod(f"x{i}"))
    stale = store.watch_pods("default", resource_version=rv, timeout_seconds=60)
    got = [event async for event in stale]
    assert len(got) == 1 and got[0]["type"] == "ERROR"
    assert got[0]["object"] == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": f"too old resource version: {rv} ({store.resource_version - 4})",
        "reason": "Expired",
        "code": 410,
    }
    current = str(store.resource_version)
    store.expire_history()
    expired = [e async for e in store.watch_pods("default", resource_version=current)]
    assert [e["type"] for e in expired] == ["ERROR"]
    fresh = store.list_pods("default")["metadata"]["resourceVersion"]
    ok = store.watch_pods("default", resource_version=fresh, timeout_seconds=1)
    assert [e async for e in ok] == []


async def test_selector_transitions(autojump_clock: trio.testing.MockClock) -> None:
    store = Store()
    store.create_pod("default", _pod("a"))
    watch = store.watch_pods(
        "default", resource_version="0", field_selector="status.phase=Running", timeout_seconds=60
    )
    _schedule(store, "a")  # starts matching -> ADDED
    store.update_pod("default", "a", lambda p: p["status"].update(podIP="10.0.0.1"))  # MODIFIED
    store.update_pod("default", "a", lambda p: p["status"].update(phase="Failed"))  # -> DELETED
    rv_after = store.resource_version
    events = []
    async for event in watch:
        events.append(event)
        if len(events) == 3:
            break
    assert [e["type"] for e in events] == ["ADDED", "MODIFIED", "DELETED"]
    deleted = events[2]["object"]
    assert deleted["status"]["phase"] == "Running"  # previous content ...
    assert deleted["metadata"]["resourceVersion"] == str(rv_after)  # ... with the new RV
    watch.close()


async def test_bookmarks_timeout_and_stop(autojump_clock: trio.testing.MockClock) -> None:
    store = Store(bookmark_interval=5)
    start = trio.current_time()
    watch = store.watch_pods("default", resource_version="0", bookmarks=True, timeout_seconds=12)
    got = [e async for e in watch]
    assert [e["type"] for e in got] == ["BOOKMARK", "BOOKMARK"]
    assert got[0]["object"] == {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {"resourceVersion": str(store.resource_version), "creationTimestamp": None},
        "spec": {"containers": None},
        "status": {},
    }
    assert trio.current_time() - start == pytest.approx(12)
    no_marks = store.watch_pods("default", timeout_seconds=12)
    assert [e async for e in no_marks] == []

    stop = trio.Event()
    stoppable = store.watch_pods("default", stop=stop)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: _delayed_set(stop, 3))
        t0 = trio.current_time()
        assert [e async for e in stoppable] == []
        assert trio.current_time() - t0 == pytest.approx(3)
    assert store.statistics()["watchers"] == 0


async def _delayed_set(event: trio.Event, delay: float) -> None:
    await trio.sleep(delay)
    event.set()


async def test_slow_watcher_is_ended_not_blocking(autojump_clock: trio.testing.MockClock) -> None:
    store = Store(watch_buffer=3)
    slow = store.watch_pods("default", resource_version="0", timeout_seconds=600)
    for i in range(10):  # writers never block
        store.create_pod("default", _pod(f"p{i}"))
    names = [e["object"]["metadata"]["name"] async for e in slow]
    assert names == ["p0", "p1", "p2"]  # drained what it had, then ended
    assert store.statistics()["watchers"] == 0


async def test_subscribe_sees_every_pod_change() -> None:
    store = Store()
    changes = store.subscribe()
    store.create_pod("default", _pod())
    _schedule(store)
    store.delete_pod("default", "p")
    store.remove_pod("default", "p")
    seen = [changes.receive_nowait() for _ in range(4)]
    assert [t for t, _ in seen] == ["ADDED", "MODIFIED", "MODIFIED", "DELETED"]
    assert seen[2][1]["metadata"]["deletionTimestamp"]
    assert seen[0][1]["kind"] == "Pod"
    with pytest.raises(trio.WouldBlock):
        changes.receive_nowait()


async def test_request_log_keeps_the_newest_entries_and_reads_by_seq() -> None:
    from kuberun_trio.cluster.requestlog import RequestLog

    log = RequestLog(max_entries=100)
    for i in range(1000):
        log.add("http", "GET", f"/p/{i}", 200)
    assert 100 <= len(log.entries) <= 110  # trimmed in batches
    assert log.entries[-1].seq == 999 and log.entries[0].seq == log.dropped
    assert [e.seq for e in log.since(995)] == [995, 996, 997, 998, 999]
    assert log.since(0) == log.entries  # what was trimmed is gone, the rest is there
    assert log.since(1000) == []
