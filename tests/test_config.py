"""The ``kubernetes:`` configuration: YAML in, frozen values or key-path errors out."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Any

import attrs
import psutil
import pytest

from kuberun_trio.core.config import (
    DEFAULT_IDLE_COMMAND,
    ConfigProblems,
    InvalidValue,
    KubernetesConfig,
    duration,
    key_path,
    load_config,
    make_converter,
    parse_config,
    parse_duration,
    structure_section,
)
from kuberun_trio.errors import ConfigError, ConfigErrors

PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(error: ConfigError) -> list[tuple[str, str]]:
    errors = error.errors if isinstance(error, ConfigErrors) else (error,)
    return [(e.path, e.problem) for e in errors]


def load_errors(tmp_path: Path, text: str) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    return problems_of(info.value)


# -- defaults and a full file -------------------------------------------------------------------


def test_defaults() -> None:
    config = KubernetesConfig.default()
    assert config.connection.source == "kubeconfig"
    conn = config.connection
    assert (conn.path, conn.qps, conn.burst) == ("/api", 50, 100)
    pod = config.pod
    assert pod.metadata == {"namespace": "default", "generateName": "kuberun-"}
    assert pod.spec == {
        "containers": [{"name": "shell", "image": "busybox", "command": list(DEFAULT_IDLE_COMMAND)}]
    }
    assert (pod.console_container_number, pod.mode) == (0, "connection")
    assert pod.shell_command == ("/bin/sh",)
    assert pod.subsystems == {"sftp": "/usr/lib/openssh/sftp-server"}
    t = config.timeouts
    assert (t.pod_start, t.pod_stop, t.command_start, t.signal, t.window, t.http) == (
        60.0, 60.0, 60.0, 60.0, 60.0, 15.0,
    )  # fmt: skip


@pytest.mark.parametrize("section", ["kubernetes:\n", "kubernetes: {}\n", "kubernetes:\n  pod:\n"])
def test_empty_section_is_the_default(tmp_path: Path, section: str) -> None:
    assert load_config(write(tmp_path, section)) == KubernetesConfig.default()


def test_containerssh_style_file_loads(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """
            ssh: {listen: "0.0.0.0:2222"}   # other sections belong to the server config
            kubernetes:
              connection:
                host: "https://10.0.0.1:6443"
                cacert: |
                  -----BEGIN CERTIFICATE-----
                  MIIB
                  -----END CERTIFICATE-----
                bearerTokenFile: /var/run/token
                serverName: kubernetes.default.svc
                qps: 20
                burst: 40
              pod:
                metadata:
                  namespace: ssh-users
                  labels: {team: blue}
                spec:
                  containers:
                    - name: sidecar
                      image: nginx
                    - name: shell
                      image: ubuntu:22.04
                      env: [{name: A, value: b}]
                  restartPolicy: Always
                consoleContainerNumber: 1
                idleCommand: [/bin/sleep, infinity]
                shellCommand: [/bin/bash, -l]
                subsystems: {sftp: /usr/libexec/sftp-server}
                exposeAuthMetadataAsEnv: {team: TEAM}
                exposeAuthMetadataAsLabels: {team: example.com/team}
                exposeAuthMetadataAsAnnotations: {token: example.com/token}
                mode: connection
              timeouts:
                podStart: 2m
                podStop: 1m30s
                commandStart: 500ms
                signal: 5
                window: 0.25
                http: 1h2m3.5s
            """,
        )
    )
    conn = config.connection
    assert conn.source == "host"
    assert (conn.host, conn.cacert, conn.bearer_token_file) == (
        "https://10.0.0.1:6443", PEM, "/var/run/token",
    )  # fmt: skip
    assert (conn.server_name, conn.qps, conn.burst) == ("kubernetes.default.svc", 20.0, 40)
    pod = config.pod
    assert pod.metadata == {
        "namespace": "ssh-users",
        "labels": {"team": "blue"},
        "generateName": "kuberun-",
    }
    assert pod.spec["containers"][1]["image"] == "ubuntu:22.04"
    assert pod.console_container_number == 1
    assert pod.idle_command == ("/bin/sleep", "infinity")
    assert pod.shell_command == ("/bin/bash", "-l")
    assert pod.subsystems == {"sftp": "/usr/libexec/sftp-server"}
    assert pod.expose_auth_metadata_as_env == {"team": "TEAM"}
    assert pod.expose_auth_metadata_as_labels == {"team": "example.com/team"}
    assert pod.expose_auth_metadata_as_annotations == {"token": "example.com/token"}
    t = config.timeouts
    assert (t.pod_start, t.pod_stop, t.command_start, t.signal, t.window, t.http) == (
        120.0, 90.0, 0.5, 5.0, 0.25, 3723.5,
    )  # fmt: skip


def test_config_does_not_alias_the_input() -> None:
    data: dict[str, Any] = {"pod": {"spec": {"containers": [{"name": "a", "image": "b"}]}}}
    config = parse_config(data)
    data["pod"]["spec"]["containers"][0]["image"] = "changed"
    assert config.pod.spec["containers"][0]["image"] == "b"


def test_default_spec_follows_idle_command() -> None:
    config = parse_config({"pod": {"idleCommand": ["/bin/sleep", "1d"]}})
    assert config.pod.spec["containers"][0]["command"] == ["/bin/sleep", "1d"]


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({"labels": {"a": "b"}}, {"labels": {"a": "b"}, "namespace": "default",
                                  "generateName": "kuberun-"}),
        ({"namespace": "x", "generateName": "ssh-"}, {"namespace": "x", "generateName": "ssh-"}),
        ({"name": "fixed"}, {"name": "fixed", "namespace": "default"}),
    ],
)  # fmt: skip
def test_metadata_defaults(metadata: dict[str, Any], expected: dict[str, Any]) -> None:
    assert parse_config({"pod": {"metadata": metadata}}).pod.metadata == expected


# -- connection sources ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("connection", "source", "environ", "kubeconfig"),
    [
        ({}, "kubeconfig", {"KUBECONFIG": "/a:/b"}, "/a:/b"),
        ({}, "kubeconfig", {}, os.path.expanduser("~/.kube/config")),
        (
            {"kubeconfig": "/etc/kc", "context": "dev"},
            "kubeconfig",
            {"KUBECONFIG": "/a"},
            "/etc/kc",
        ),
        ({"kubeconfig": "~/kc"}, "kubeconfig", {}, os.path.expanduser("~/kc")),
        ({"inCluster": True}, "inCluster", {}, None),
        ({"host": "127.0.0.1:6443", "insecure": True}, "host", {}, None),
        ({"host": "h:1", "username": "u", "password": "p"}, "host", {}, None),
        ({"host": "h:1", "certFile": "/c", "key": PEM.replace("CERT", "KEY")}, "host", {}, None),
    ],
)
def test_connection_source(
    connection: dict[str, Any], source: str, environ: dict[str, str], kubeconfig: str | None
) -> None:
    conn = parse_config({"connection": connection}).connection
    assert conn.source == source
    if kubeconfig is not None:
        assert conn.kubeconfig_path(environ) == kubeconfig


# -- durations ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("60s", 60.0), ("1m30s", 90.0), ("500ms", 0.5), ("1h", 3600.0), ("1.5h", 5400.0),
        ("2h45m", 9900.0), ("300us", 3e-4), ("2µs", 2e-6), ("+5s", 5.0), (".5s", 0.5),
        ("1000000ns", 1e-3), (5, 5.0), (2.5, 2.5),
    ],
)  # fmt: skip
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("6x", 'invalid duration "6x"'),
        ("60", 'invalid duration "60" (missing unit, e.g. "60s")'),
        ("", 'invalid duration ""'),
        ("s", 'invalid duration "s"'),
        ("1m30", 'invalid duration "1m30"'),
        ("1 m", 'invalid duration "1 m"'),
        ("-5s", "must be a positive duration, got '-5s'"),
        ("0", "must be a positive duration, got '0'"),
        (0, "must be a positive duration, got 0"),
        (float("nan"), "must be a positive duration, got nan"),
        (True, 'expected a duration like "60s" or a number of seconds, got boolean'),
        (None, 'expected a duration like "60s" or a number of seconds, got null'),
    ],
)
def test_bad_durations(value: object, problem: str) -> None:
    with pytest.raises(InvalidValue) as info:
        parse_duration(value)
    assert str(info.value) == problem


# -- errors name their key path -------------------------------------------------------------------

ERRORS = [
    # (YAML under `kubernetes:`, expected (path, problem) list)
    ("timeouts: {podStart: 6x}", [("kubernetes.timeouts.podStart", 'invalid duration "6x"')]),
    ("timeouts: {podstart: 5s}",
     [("kubernetes.timeouts.podstart", "unknown key (did you mean podStart?)")]),
    ("timeouts: 5", [("kubernetes.timeouts", "expected a mapping, got integer")]),
    ("connection: {foo: 1}", [("kubernetes.connection.foo", "unknown key")]),
    ("conection: {}", [("kubernetes.conection", "unknown key (did you mean connection?)")]),
    ("connection: {qps: '5'}", [("kubernetes.connection.qps", "expected a number, got string")]),
    ("connection: {burst: 1.5}",
     [("kubernetes.connection.burst", "expected an integer, got number")]),
    ("connection: {inCluster: 'false'}",
     [("kubernetes.connection.inCluster", "expected a boolean, got string")]),
    ("connection: {host: 5}", [("kubernetes.connection.host", "expected a string, got integer")]),
    ("connection: {host: h, kubeconfig: /k}",
     [("kubernetes.connection",
       "host, kubeconfig and inCluster are alternatives; set only one (found host, kubeconfig)")]),
    ("connection: {inCluster: true, bearerToken: t}",
     [("kubernetes.connection.bearerToken",
       "only valid with host (inCluster brings its own credentials)")]),
    ("connection: {insecure: true}",
     [("kubernetes.connection.insecure",
       "only valid with host (kubeconfig brings its own credentials)")]),
    ("connection: {host: h, context: c}",
     [("kubernetes.connection.context", "only valid with kubeconfig")]),
    ("connection: {host: h, bearerToken: t, bearerTokenFile: /f}",
     [("kubernetes.connection.bearerTokenFile",
       "bearerToken and bearerTokenFile are alternatives; set one")]),
    ("connection: {host: h, certFile: /c}",
     [("kubernetes.connection.keyFile",
       "a client certificate needs both cert(File) and key(File)")]),
    ("connection: {host: h, username: u}",
     [("kubernetes.connection.password", "basic auth needs both username and password")]),
    ("connection: {host: h, cacert: notpem}",
     [("kubernetes.connection.cacert", "expected PEM text (-----BEGIN ...)")]),
    ("connection: {host: h, cacertFile: /ca, insecure: true}",
     [("kubernetes.connection.insecure", "cannot be combined with a CA certificate")]),
    ("connection: {host: ''}", [("kubernetes.connection.host", "must not be empty")]),
    ("connection: {path: api}", [("kubernetes.connection.path", "must start with /")]),
    ("connection: {qps: 0, burst: 0}",
     [("kubernetes.connection.qps", "must be positive"),
      ("kubernetes.connection.burst", "must be at least 1")]),
    ("pod: {mode: sessions}",
     [("kubernetes.pod.mode",
       "unknown mode 'sessions'; choose one of connection, session, persistent")]),
    ("pod: {mode: persistent, createMissingPods: 'no', persistentIdleTimeout: 1x}",
     [("kubernetes.pod.createMissingPods", "expected a boolean, got string"),
      ("kubernetes.pod.persistentIdleTimeout", 'invalid duration "1x"')]),
    ("pod: {agentPath: /usr/bin/agent}",
     [("kubernetes.pod.agentPath",
       "unknown key: kuberun_trio needs no agent in the pod; remove it")]),
    ("pod: {idleCommand: sleep}",
     [("kubernetes.pod.idleCommand", "expected a list of strings, got string")]),
    ("pod: {shellCommand: [/bin/sh, 5]}",
     [("kubernetes.pod.shellCommand[1]", "expected a string, got integer")]),
    ("pod: {idleCommand: []}",
     [("kubernetes.pod.idleCommand", "must be a non-empty list starting with a program")]),
    ("pod: {subsystems: {sftp: 1}}",
     [("kubernetes.pod.subsystems.sftp", "expected a string, got integer")]),
    ("pod: {subsystems: {sftp: ''}}", [("kubernetes.pod.subsystems.sftp", "must not be empty")]),
    ("pod: {consoleContainerNumber: 1}",
     [("kubernetes.pod.consoleContainerNumber",
       "must index a container of spec.containers (0..0)")]),
    ("pod: {consoleContainerNumber: -1}",
     [("kubernetes.pod.consoleContainerNumber",
       "must index a container of spec.containers (0..0)")]),
    ("pod: {spec: {containers: [{name: shell}]}}",
     [("kubernetes.pod.spec.containers[0].image", "required")]),
    ("pod: {spec: {containers: [{image: busybox}]}}",
     [("kubernetes.pod.spec.containers[0].name", "required")]),
    ("pod: {spec: {containers: [{name: Shell, image: ''}]}}",
     [("kubernetes.pod.spec.containers[0].name",
       "must be a DNS-1123 label: lower-case letters, digits and '-', starting and ending "
       "with a letter or digit"),
      ("kubernetes.pod.spec.containers[0].image", "must not be empty")]),
    ("pod: {spec: {containers: [{name: a, image: b}, {name: a, image: c}]}}",
     [("kubernetes.pod.spec.containers[1].name", "duplicate container name 'a'")]),
    ("pod: {spec: {initContainers: [{name: a}], containers: [{name: a, image: b}]}}",
     [("kubernetes.pod.spec.initContainers[0].name", "duplicate container name 'a'"),
      ("kubernetes.pod.spec.initContainers[0].image", "required")]),
    ("pod: {spec: {}}", [("kubernetes.pod.spec.containers", "required")]),
    ("pod: {spec: {containers: []}}",
     [("kubernetes.pod.spec.containers", "must list at least one container")]),
    ("pod: {spec: {containers: [nginx]}}",
     [("kubernetes.pod.spec.containers[0]",
       "expected a mapping (a Container), got string")]),
    ("pod: {spec: {restartPolicy: Sometimes, containers: [{name: a, image: b}]}}",
     [("kubernetes.pod.spec.restartPolicy", "must be one of Always, OnFailure, Never")]),
    ("pod: {spec: [1]}", [("kubernetes.pod.spec", "expected a mapping, got list")]),
    ("pod: {metadata: {namespace: Users}}",
     [("kubernetes.pod.metadata.namespace",
       "must be a DNS-1123 label: lower-case letters, digits and '-', starting and ending "
       "with a letter or digit")]),
    ("pod: {metadata: {uid: x}}", [("kubernetes.pod.metadata.uid", "unknown key")]),
    ("pod: {metadata: {generateName: 5}}",
     [("kubernetes.pod.metadata.generateName", "expected a string, got integer")]),
    ("pod: {metadata: {labels: {'app.kubernetes.io/name': 'a b'}}}",
     [('kubernetes.pod.metadata.labels["app.kubernetes.io/name"]',
       "must consist of letters, digits, '-', '_' and '.', starting and ending with a letter "
       "or digit")]),
    ("pod: {metadata: {annotations: {'-x': y}}}",
     [('kubernetes.pod.metadata.annotations["-x"]',
       "invalid key: name part must consist of letters, digits, '-', '_' and '.', starting "
       "and ending with a letter or digit")]),
    ("pod: {exposeAuthMetadataAsEnv: {team: 1TEAM}}",
     [("kubernetes.pod.exposeAuthMetadataAsEnv.team",
       "'1TEAM': must be a valid environment variable name ([A-Za-z_][A-Za-z0-9_]*)")]),
    ("pod: {exposeAuthMetadataAsLabels: {team: 'kuberun.trio/team'}}",
     [("kubernetes.pod.exposeAuthMetadataAsLabels.team",
       "'kuberun.trio/team': reserved for kuberun_trio's own labels and annotations")]),
    ("pod: {exposeAuthMetadataAsAnnotations: {team: 'Bad_Prefix/x'}}",
     [("kubernetes.pod.exposeAuthMetadataAsAnnotations.team",
       "'Bad_Prefix/x': prefix 'Bad_Prefix' must be a DNS-1123 subdomain: lower-case letters, "
       "digits, '-' and '.', each part starting and ending with a letter or digit")]),
    ("namespace: x",
     [("kubernetes.namespace", "unknown key: the namespace is set as pod.metadata.namespace")]),
]  # fmt: skip


@pytest.mark.parametrize(("body", "expected"), ERRORS, ids=[e[0][:50] for e in ERRORS])
def test_errors_name_the_key_path(
    tmp_path: Path, body: str, expected: list[tuple[str, str]]
) -> None:
    assert load_errors(tmp_path, "kubernetes:\n  " + body + "\n") == expected


def test_all_errors_are_reported_at_once(tmp_path: Path) -> None:
    body = """
        kubernetes:
          connection: {fooo: 1, qps: "5"}
          pod:
            idleCommand: sleep
            metadata: {namespace: Bad_NS}
            spec:
              containers: [{name: a}]
          timeouts: {podStart: 6x, http: -1}
    """
    with pytest.raises(ConfigErrors) as info:
        load_config(write(tmp_path, body))
    assert [path for path, _ in problems_of(info.value)] == [
        "kubernetes.connection.qps",
        "kubernetes.connection.fooo",
        "kubernetes.pod.idleCommand",
        "kubernetes.pod.metadata.namespace",
        "kubernetes.pod.spec.containers[0].image",
        "kubernetes.timeouts.podStart",
        "kubernetes.timeouts.http",
    ]
    message = str(info.value)
    assert message.startswith("7 configuration errors:\n")
    assert '  kubernetes.timeouts.podStart: invalid duration "6x"' in message.splitlines()
    assert (info.value.path, info.value.problem) == problems_of(info.value)[0]


@pytest.mark.parametrize(
    ("text", "path", "problem"),
    [
        ("ssh: {}\n", "kubernetes", "required: {file} has no kubernetes section"),
        ("", "kubernetes", "required: {file} has no kubernetes section"),
        ("- a\n", "", "{file}: expected a mapping at the top level, got list"),
        ("kubernetes: 5\n", "kubernetes", "expected a mapping, got integer"),
        ("kubernetes: {pod: {\n", "", "{file}: invalid YAML: "),
        ("kubernetes:\n  pod: {}\n  pod: {}\n", "", "{file}: invalid YAML: "),
    ],
)
def test_file_level_errors(tmp_path: Path, text: str, path: str, problem: str) -> None:
    file = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(file)
    assert info.value.path == path
    assert info.value.problem.startswith(problem.format(file=file))


def test_duplicate_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="duplicate key 'pod'") as info:
        load_config(write(tmp_path, "kubernetes:\n  pod: {}\n  pod: {}\n"))
    assert "line 3" in str(info.value)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read configuration file .*missing\.yaml"):
        load_config(tmp_path / "missing.yaml")


def test_parse_config_path_prefix() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"timeouts": {"http": "x"}}, path_prefix="backend.kubernetes")
    assert info.value.path == "backend.kubernetes.timeouts.http"


# -- the generic helpers, as a future section would use them ---------------------------------------


@attrs.frozen
class _ListenSection:
    listen: str = "0.0.0.0:2222"
    host_keys: tuple[str, ...] = ()
    client_alive: float = duration(30.0)
    max_sessions: int = attrs.field(default=10, metadata={"key": "maxSessions_"})


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"hostKeys": ["/k"], "clientAlive": "1m"}, _ListenSection(host_keys=("/k",),
                                                                   client_alive=60.0)),
        ({"maxSessions_": 3}, _ListenSection(max_sessions=3)),
        (None, _ListenSection()),
        ({"listen": 1, "hostKeys": "k", "clientAlive": "x", "maxSessions": 3},
         [("ssh.listen", "expected a string, got integer"),
          ("ssh.hostKeys", "expected a list of strings, got string"),
          ("ssh.clientAlive", 'invalid duration "x"'),
          ("ssh.maxSessions", "unknown key (did you mean maxSessions_?)")]),
    ],
)  # fmt: skip
def test_structure_section_for_another_section(data: object, expected: object) -> None:
    problems = ConfigProblems()
    result = structure_section(make_converter(), data, _ListenSection, "ssh", problems)
    if isinstance(expected, list):
        assert result is None
        assert [(e.path, e.problem) for e in problems.errors] == expected
        with pytest.raises(ConfigErrors):
            problems.raise_if_any()
    else:
        assert result == expected
        assert len(problems) == 0
        problems.raise_if_any()


@pytest.mark.parametrize(
    ("parent", "key", "expected"),
    [
        ("a", "b", "a.b"),
        ("", "b", "b"),
        ("a", 3, "a[3]"),
        ("a", "app.kubernetes.io/name", 'a["app.kubernetes.io/name"]'),
        ("a", "", 'a[""]'),
        ("a", True, "a[True]"),
    ],
)
def test_key_path(parent: str, key: object, expected: str) -> None:
    assert key_path(parent, key) == expected


# -- the default idle command really idles, and stops on SIGTERM -----------------------------------


def test_default_idle_command_exits_promptly_on_sigterm() -> None:
    proc = subprocess.Popen(DEFAULT_IDLE_COMMAND, start_new_session=True)
    try:
        deadline = time.monotonic() + 5
        while not psutil.Process(proc.pid).children() and time.monotonic() < deadline:
            time.sleep(0.01)  # wait until the trap is set and sleep runs
        assert psutil.Process(proc.pid).children(), "idle command did not start sleeping"
        assert proc.poll() is None
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
        assert time.monotonic() - started < 2
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the orphaned background sleep
