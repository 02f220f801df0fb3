"""Discovery: what kubectl 1.30+ and kubernetes-asyncio probe before any real request.

Theory of operation
-------------------
:func:`serve_discovery` answers ``/version`` (:data:`GIT_VERSION`, or for an older kubectl
the newest version within its skew, :func:`version_for`), the health endpoints, ``/api``,
``/api/v1`` and ``/apis`` (or returns None for every other path). The core
group's resources (pods with their subresources, namespaces, events) are one
table, :data:`RESOURCES`, rendered two ways: the legacy ``APIVersions`` /
``APIResourceList`` documents, and -- when the ``Accept`` header asks for
``as=APIGroupDiscoveryList;g=apidiscovery.k8s.io`` in ``v2`` or ``v2beta1`` --
aggregated discovery, in which ``/api`` lists the core group and ``/apis`` the
one other group, ``coordination.k8s.io`` (Leases, table :data:`GROUP_RESOURCES`),
which the legacy ``/apis``, ``/apis/coordination.k8s.io`` and
``/apis/coordination.k8s.io/v1`` documents list too. ``/openapi/*`` is left to the router,
which answers the generic NotFound so clients fall back.
"""

from __future__ import annotations

import re
from typing import Any

from .httptypes import Request, Response
from .params import json_response, wants

GIT_VERSION = "v1.33.0"
"""The version the stand-in reports: the newest minor of the kubectl we test with (1.33)."""
OLDEST_MINOR = 30
"""The oldest kubectl minor the stand-in serves fully (WebSocket streaming: exec, attach)."""
_KUBECTL_AGENT = re.compile(r"kubectl[^/]*/v1\.(\d+)\.")
_DISCOVERY_TYPE = "application/json;g=apidiscovery.k8s.io;v={v};as=APIGroupDiscoveryList"

_POD_VERBS = ["create", "delete", "get", "list", "patch", "watch"]
RESOURCES: list[dict[str, Any]] = [
    {
        "name": "events",
        "singularName": "event",
        "namespaced": True,
        "kind": "Event",
        "verbs": ["get", "list", "watch"],
        "shortNames": ["ev"],
    },
    {
        "name": "namespaces",
        "singularName": "namespace",
        "namespaced": False,
        "kind": "Namespace",
        "verbs": ["create", "get", "list", "watch"],
        "shortNames": ["ns"],
    },
    {
        "name": "pods",
        "singularName": "pod",
        "namespaced": True,
        "kind": "Pod",
        "verbs": _POD_VERBS,
        "shortNames": ["po"],
        "categories": ["all"],
    },
    {
        "name": "pods/attach",
        "singularName": "",
        "namespaced": True,
        "kind": "PodAttachOptions",
        "verbs": ["create", "get"],
    },
    {
        "name": "pods/exec",
        "singularName": "",
        "namespaced": True,
        "kind": "PodExecOptions",
        "verbs": ["create", "get"],
    },
    {"name": "pods/log", "singularName": "", "namespaced": True, "kind": "Pod", "verbs": ["get"]},
    {
        "name": "pods/portforward",
        "singularName": "",
        "namespaced": True,
        "kind": "PodPortForwardOptions",
        "verbs": ["create", "get"],
    },
    {
        "name": "pods/status",
        "singularName": "",
        "namespaced": True,
        "kind": "Pod",
        "verbs": ["get"],
    },
]


COORDINATION = "coordination.k8s.io"
GROUP_RESOURCES: dict[str, list[dict[str, Any]]] = {
    COORDINATION: [
        {
            "name": "leases",
            "singularName": "lease",
            "namespaced": True,
            "kind": "Lease",
            "verbs": ["create", "delete", "get", "list", "update", "watch"],
        },
    ],
}
"""Group -> its ``v1`` resources (every non-core group serves only ``v1``)."""


def _group(name: str) -> dict[str, Any]:
    version = {"groupVersion": f"{name}/v1", "version": "v1"}
    return {"name": name, "versions": [version], "preferredVersion": version}


def _version(git_version: str) -> dict[str, Any]:
    major, minor = git_version.lstrip("v").split(".")[:2]
    return {
        "major": major,
        "minor": minor,
        "gitVersion": git_version,
        "gitCommit": "9edcffcde5595e8a5b1a35f88c421764e575afce",
        "gitTreeState": "clean",
        "buildDate": "2024-08-13T07:28:49Z",
        "goVersion": "go1.22.5",
        "compiler": "gc",
        "platform": "linux/amd64",
    }


def _api_versions(req: Request) -> dict[str, Any]:
    host = req.headers.get("host") or "127.0.0.1:6443"
    return {
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": host}],
    }


def _resource_list() -> dict[str, Any]:
    return {"kind": "APIResourceList", "groupVersion": "v1", "resources": RESOURCES}


def _aggregated_group(name: str) -> dict[str, Any]:
    resources = [
        {
            "resource": res["name"],
            "responseKind": {"group": name, "version": "v1", "kind": res["kind"]},
            "scope": "Namespaced" if res["namespaced"] else "Cluster",
            "singularResource": res["singularName"],
            "verbs": res["verbs"],
        }
        for res in GROUP_RESOURCES[name]
    ]
    return {
        "metadata": {"name": name, "creationTimestamp": None},
        "versions": [{"version": "v1", "resources": resources, "freshness": "Current"}],
    }


def _aggregated(core: bool, version: str) -> dict[str, Any]:
    items: list[dict[str, Any]] = []
    if not core:
        items = [_aggregated_group(name) for name in GROUP_RESOURCES]
    else:
        resources = []
        for res in RESOURCES:
            if "/" in res["name"]:
                continue
            entry: dict[str, Any] = {
                "resource": res["name"],
                "responseKind": {"group": "", "version": "", "kind": res["kind"]},
                "scope": "Namespaced" if res["namespaced"] else "Cluster",
                "singularResource": res["singularName"],
                "verbs": res["verbs"],
            }
            for key in ("shortNames", "categories"):
                if key in res:
                    entry[key] = res[key]
            subs = [
                {
                    "subresource": sub["name"].split("/", 1)[1],
                    "responseKind": {"group": "", "version": "", "kind": sub["kind"]},
                    "verbs": sub["verbs"],
                }
                for sub in RESOURCES
                if sub["name"].startswith(res["name"] + "/")
            ]
            if subs:
                entry["subresources"] = subs
            resources.append(entry)
        items.append(
            {
                "metadata": {"creationTimestamp": None},
                "versions": [{"version": "v1", "resources": resources, "freshness": "Current"}],
            }
        )
    return {
        "kind": "APIGroupDiscoveryList",
        "apiVersion": f"apidiscovery.k8s.io/{version}",
        "metadata": {},
        "items": items,
    }


def version_for(git_version: str, user_agent: str) -> str:
    """``git_version``, or for an older kubectl the newest minor within its skew (+/-1).

    kubectl warns on ``kubectl version`` when the server is more than one minor away, and
    the stand-in implements what 1.30 to 1.33 have in common, so it tells each kubectl
    1.N the newest version it could be: ``v1.(N+1).0`` (never below 1.30, never above
    ``git_version``). Other clients get ``git_version``.
    """
    match = _KUBECTL_AGENT.match(user_agent)
    major, minor, *_ = git_version.lstrip("v").split(".")
    if match is None or major != "1" or not minor.isdigit():
        return git_version
    fitting = max(OLDEST_MINOR, min(int(minor), int(match[1]) + 1))
    return git_version if fitting == int(minor) else f"v1.{fitting}.0"


def serve_discovery(req: Request, git_version: str) -> Response | None:
    """The discovery document at ``req.path``; None if it is not a discovery path."""
    path = req.path.rstrip("/") or "/"
    if path == "/version":
        return json_response(_version(version_for(git_version, req.headers.get("user-agent", ""))))
    if path in ("/healthz", "/livez", "/readyz"):
        return Response(200, b"ok", content_type="text/plain; charset=utf-8")
    if path in ("/api", "/apis"):
        wanted = wants(req, "APIGroupDiscoveryList", "apidiscovery.k8s.io")
        if wanted is not None and wanted.get("v") in ("v2", "v2beta1"):
            version = wanted["v"]
            return json_response(
                _aggregated(path == "/api", version), content_type=_DISCOVERY_TYPE.format(v=version)
            )
        if path == "/api":
            return json_response(_api_versions(req))
        groups = [_group(name) for name in GROUP_RESOURCES]
        return json_response({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
    if path == "/api/v1":
        return json_response(_resource_list())
    for name, resources in GROUP_RESOURCES.items():
        if path == f"/apis/{name}":
            return json_response({"kind": "APIGroup", "apiVersion": "v1", **_group(name)})
        if path == f"/apis/{name}/v1":
            return json_response({"kind": "APIResourceList", "apiVersion": "v1",
                                  "groupVersion": f"{name}/v1", "resources": resources})
    return None
