"""The per-connection pod manifest, and names that can never make pod creation fail."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Mapping
from typing import Any

import attrs
import pytest

from kuberun_trio.core.config import KubernetesConfig, parse_config
from kuberun_trio.core.podtemplate import (
    ANNOTATION_CLIENT_ADDRESS,
    ANNOTATION_USERNAME,
    LABEL_CONNECTION_ID,
    LABEL_INSTANCE,
    LABEL_MANAGED_BY,
    LABEL_USERNAME,
    build_pod,
    dns1123_label_problem,
    env_name_problem,
    label_selector_for_instance,
    label_value_problem,
    pod_name_for_connection,
    qualified_name_problem,
    sanitize_generate_name,
    sanitize_label_value,
)
from kuberun_trio.errors import ConfigError

# Independent restatements of the API server's rules (k8s.io/apimachinery validation).
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def valid_label_value(value: str) -> bool:
    return len(value) <= 63 and LABEL_VALUE.fullmatch(value) is not None


def valid_generated_name(prefix: str) -> bool:
    """The name the server makes from ``prefix``: at most 58 kept, 5 random chars added."""
    name = prefix[:58] + "x7k2q"
    return len(name) <= 63 and DNS_SUBDOMAIN.fullmatch(name) is not None


def pod(
    config: KubernetesConfig | None = None,
    *,
    connection_id: str = "c0ffee",
    username: str = "alice",
    client_address: str = "192.0.2.7:50022",
    instance: str = "gw-1",
    auth_metadata: Mapping[str, str] | None = None,
    auth_env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    return build_pod(
        config or KubernetesConfig.default(),
        connection_id=connection_id,
        username=username,
        client_address=client_address,
        instance=instance,
        auth_metadata=auth_metadata or {},
        auth_env=auth_env or {},
    )


# -- the manifest -------------------------------------------------------------------------------


def test_default_pod() -> None:
    manifest = pod()
    assert (manifest["apiVersion"], manifest["kind"]) == ("v1", "Pod")
    meta = manifest["metadata"]
    assert meta["namespace"] == "default"
    assert meta["generateName"] == "kuberun-"
    assert "name" not in meta
    assert meta["labels"] == {
        LABEL_MANAGED_BY: "kuberun-trio",
        LABEL_CONNECTION_ID: "c0ffee",
        LABEL_USERNAME: "alice",
        LABEL_INSTANCE: "gw-1",
    }
    assert meta["annotations"] == {
        ANNOTATION_USERNAME: "alice",
        ANNOTATION_CLIENT_ADDRESS: "192.0.2.7:50022",
    }
    (console,) = manifest["spec"]["containers"]
    assert console["command"] == list(KubernetesConfig.default().pod.idle_command)
    assert console["args"] == []
    assert "env" not in console
    assert manifest["spec"]["restartPolicy"] == "Never"
    json.dumps(manifest)  # JSON-ready


USER_SPEC = {
    "pod": {
        "metadata": {
            "namespace": "ssh",
            "generateName": "sess-",
            "labels": {"team": "blue", LABEL_USERNAME: "spoofed"},
            "annotations": {"note": "x"},
        },
        "spec": {
            "containers": [
                {"name": "sidecar", "image": "nginx", "command": ["nginx"], "args": ["-g"]},
                {
                    "name": "shell",
                    "image": "ubuntu",
                    "args": ["ignored"],
                    "env": [{"name": "KEEP", "value": "1"}, {"name": "TEAM", "value": "old"}],
                },
            ],
            "restartPolicy": "Always",
            "nodeSelector": {"disk": "ssd"},
        },
        "consoleContainerNumber": 1,
        "idleCommand": ["/bin/sleep", "infinity"],
        "exposeAuthMetadataAsEnv": {"team": "TEAM", "absent": "ABSENT"},
        "exposeAuthMetadataAsLabels": {"team": "example.com/team", "absent": "absent"},
        "exposeAuthMetadataAsAnnotations": {"token": "example.com/token", "absent": "absent"},
    }
}


def test_user_spec_is_respected_and_completed() -> None:
    config = parse_config(USER_SPEC)
    manifest = pod(
        config,
        auth_metadata={"team": "red team!", "token": "t" * 10_000},
        auth_env={"EXTRA": "e", "TEAM": "from-auth", "bad name": "x", "": "y"},
    )
    meta, spec = manifest["metadata"], manifest["spec"]
    assert (meta["namespace"], meta["generateName"]) == ("ssh", "sess-")
    assert meta["labels"]["team"] == "blue"
    assert meta["labels"][LABEL_USERNAME] == "alice"  # ours win over configured labels
    assert meta["labels"]["example.com/team"] == sanitize_label_value("red team!")
    assert "absent" not in meta["labels"]
    assert meta["annotations"]["note"] == "x"
    token = meta["annotations"]["example.com/token"]
    assert len(token) == 4096 and token.endswith("…")
    sidecar, console = spec["containers"]
    assert sidecar == {"name": "sidecar", "image": "nginx", "command": ["nginx"], "args": ["-g"]}
    assert console["command"] == ["/bin/sleep", "infinity"]
    assert console["args"] == []
    assert console["env"] == [
        {"name": "KEEP", "value": "1"},
        {"name": "TEAM", "value": "from-auth"},  # auth_env wins over exposed metadata
        {"name": "EXTRA", "value": "e"},
    ]
    assert spec["restartPolicy"] == "Always"
    assert spec["nodeSelector"] == {"disk": "ssd"}


def test_exposed_env_without_auth_env() -> None:
    manifest = pod(parse_config(USER_SPEC), auth_metadata={"team": "red"})
    console = manifest["spec"]["containers"][1]
    assert console["env"] == [{"name": "KEEP", "value": "1"}, {"name": "TEAM", "value": "red"}]


def test_config_is_not_mutated() -> None:
    config = parse_config(USER_SPEC)
    before = json.dumps([config.pod.metadata, config.pod.spec], sort_keys=True)
    first = pod(config, auth_metadata={"team": "red"}, auth_env={"A": "b"})
    first["spec"]["containers"][0]["image"] = "changed"
    second = pod(config, connection_id="other")
    assert json.dumps([config.pod.metadata, config.pod.spec], sort_keys=True) == before
    assert second["spec"]["containers"][0]["image"] == "nginx"
    assert second["metadata"]["labels"][LABEL_CONNECTION_ID] == "other"


@pytest.mark.parametrize(
    ("name", "connection_id", "expected"),
    [
        ("shell", "c0ffee", "shell-c0ffee"),
        ("my.pod", "abc", "my.pod-abc"),
        ("shell", "Conn_ID", None),
        ("p" * 60, "c0ffee", None),
    ],
)
def test_fixed_name_gets_the_connection_id(
    name: str, connection_id: str, expected: str | None
) -> None:
    config = parse_config({"pod": {"metadata": {"name": name, "generateName": "ignored-"}}})
    meta = pod(config, connection_id=connection_id)["metadata"]
    assert "generateName" not in meta
    if expected is not None:
        assert meta["name"] == expected
    else:
        assert len(meta["name"]) <= 63 and DNS_LABEL.fullmatch(meta["name"])
        assert meta["name"] != pod_name_for_connection(name, connection_id + "x")


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        ("kuberun-", "kuberun-"),
        ("ssh.users-", "ssh.users-"),
        ("SSH_Users-", "ssh-users-"),
        ("-x", "x"),
        ("Ümläut-", "umlaut-"),
        ("日本", "kuberun-"),
        ("a" * 70, "a" * 58),
    ],
)
def test_generate_name_is_sanitised(prefix: str, expected: str) -> None:
    config = parse_config({"pod": {"metadata": {"generateName": prefix}}})
    generate_name = pod(config)["metadata"]["generateName"]
    assert generate_name == expected
    assert valid_generated_name(generate_name)


def test_console_container_out_of_range_is_a_config_error() -> None:
    config = KubernetesConfig.default()
    broken = attrs.evolve(config, pod=attrs.evolve(config.pod, console_container_number=2))
    with pytest.raises(ConfigError) as info:
        pod(broken)
    assert info.value.path == "kubernetes.pod.consoleContainerNumber"


# -- label values, selectors, annotations -------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "changed"),
    [
        ("alice", False),
        ("", False),
        ("a.b_c-d", False),
        ("x" * 63, False),
        ("x" * 64, True),
        ("alice@example.com", True),
        ("-alice", True),
        ("alice-", True),
        ("Jürgen", True),
        ("日本語", True),
        ("\ud800", True),
        (" ", True),
    ],
)
def test_sanitize_label_value(raw: str, changed: bool) -> None:
    value = sanitize_label_value(raw)
    assert valid_label_value(value)
    assert (value != raw) is changed
    if changed:
        assert re.search(r"[0-9a-f]{10}$", value)


def test_sanitized_label_values_keep_readable_text() -> None:
    assert sanitize_label_value("alice@example.com").startswith("alice-example.com-")
    assert sanitize_label_value("Jürgen").startswith("Jurgen-")


def random_text(rng: random.Random) -> str:
    alphabet = [
        "a", "Z", "0", "-", "_", ".", " ", "@", "/", "ü", "日", "\u0301", "\ud800", "\x00", "\n",
        "😀",
    ]  # fmt: skip
    length = rng.choice([0, 1, 2, 5, 62, 63, 64, 200])
    if rng.random() < 0.5:
        return "".join(rng.choice(alphabet) for _ in range(length))
    return "".join(chr(rng.randrange(0x110000)) for _ in range(length))


def test_label_values_property() -> None:
    """Any string gives a valid value, and distinct strings give distinct values."""
    rng = random.Random(20240611)
    seen: dict[str, str] = {}
    for _ in range(5000):
        raw = random_text(rng)
        value = sanitize_label_value(raw)
        assert valid_label_value(value), (raw, value)
        assert seen.setdefault(value, raw) == raw, (raw, seen[value], value)


def test_whole_manifest_property() -> None:
    """Random usernames, ids and metadata never give an invalid or unencodable manifest."""
    rng = random.Random(7)
    config = parse_config(
        {"pod": {"exposeAuthMetadataAsLabels": {"k": "example.com/k"},
                 "exposeAuthMetadataAsAnnotations": {"k": "example.com/k"},
                 "exposeAuthMetadataAsEnv": {"k": "K"},
                 "metadata": {"name": "fixed"}}}
    )  # fmt: skip
    for _ in range(500):
        manifest = pod(
            config,
            connection_id=random_text(rng),
            username=random_text(rng),
            client_address=random_text(rng),
            instance=random_text(rng),
            auth_metadata={"k": random_text(rng)},
            auth_env={random_text(rng): random_text(rng)},
        )
        meta = manifest["metadata"]
        assert all(valid_label_value(v) for v in meta["labels"].values())
        assert all(qualified_name_problem(k) is None for k in meta["labels"])
        assert len(meta["name"]) <= 63 and DNS_SUBDOMAIN.fullmatch(meta["name"])
        assert all(len(v) <= 4096 for v in meta["annotations"].values())
        assert all(
            env_name_problem(e["name"]) is None for e in manifest["spec"]["containers"][0]["env"]
        )
        json.dumps(manifest, ensure_ascii=False).encode("utf-8")  # no lone surrogates left


def test_annotations_are_capped_and_valid_utf8() -> None:
    meta = pod(username="u" * 5000 + "\ud800", client_address="\udcff")["metadata"]
    username = meta["annotations"][ANNOTATION_USERNAME]
    assert len(username) == 1024 and username.endswith("…")
    assert meta["annotations"][ANNOTATION_CLIENT_ADDRESS] == "?"


@pytest.mark.parametrize(
    ("instance", "expected"),
    [
        ("gw-1", "app.kubernetes.io/managed-by=kuberun-trio,kuberun.trio/instance=gw-1"),
        ("", "app.kubernetes.io/managed-by=kuberun-trio,kuberun.trio/instance="),
    ],
)
def test_label_selector_for_instance(instance: str, expected: str) -> None:
    assert label_selector_for_instance(instance) == expected


@pytest.mark.parametrize("instance", ["gw-1", "host.example.com:2222", "Ωmega", "x" * 100])
def test_selector_matches_the_pods_labels(instance: str) -> None:
    labels = pod(instance=instance)["metadata"]["labels"]
    requirements = dict(r.split("=", 1) for r in label_selector_for_instance(instance).split(","))
    assert requirements == {k: labels[k] for k in requirements}


# -- validators used by the configuration -------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "ok"),
    [
        ("team", True),
        ("example.com/team", True),
        ("a.b-c_d", True),
        ("example.com/", False),
        ("/team", False),
        ("Example.com/team", False),
        ("team-", False),
        ("a/b/c", False),
        ("x" * 63, True),
        ("x" * 64, False),
        ("a" * 254 + "/x", False),
    ],
)
def test_qualified_name(key: str, ok: bool) -> None:
    assert (qualified_name_problem(key) is None) is ok


@pytest.mark.parametrize(
    ("check", "value", "ok"),
    [
        (dns1123_label_problem, "ns-1", True),
        (dns1123_label_problem, "Ns", False),
        (dns1123_label_problem, "a.b", False),
        (dns1123_label_problem, "a" * 64, False),
        (env_name_problem, "_A1", True),
        (env_name_problem, "1A", False),
        (env_name_problem, "A-B", False),
        (label_value_problem, "", True),
        (label_value_problem, "a b", False),
    ],
)
def test_validators(check: Any, value: str, ok: bool) -> None:
    assert (check(value) is None) is ok


def test_sanitize_generate_name_never_empty() -> None:
    for raw in ["", "-", "...", "日本"]:
        assert sanitize_generate_name(raw) == "kuberun-"
