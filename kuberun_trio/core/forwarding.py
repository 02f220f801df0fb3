"""Port forwarding: which ``direct-tcpip`` destinations a client may reach, and why not.

Theory of operation
-------------------
Pure decisions, no I/O. An SSH client's ``ssh -L`` / ``ssh -D`` opens a ``direct-tcpip``
channel naming a host and a port. :func:`judge` answers with one of:

* :class:`ViaPortForward` -- the destination is the pod itself (``localhost``,
  ``127.0.0.1``, ``::1``, the pod's name or one of its IPs): one ``pods/portforward``
  WebSocket carries the channel (:mod:`kuberun_trio.aio.portforward`);
* :class:`ViaPodNetwork` -- another host, and ``security.forwarding.podNetworkCommand``
  is set: an exec of that argv in the pod (``{host}`` and ``{port}`` substituted in the
  elements, never through a shell) carries the bytes on its stdin/stdout;
* :class:`Refused` -- with the reason the log line gives (the client reads
  ``administratively prohibited``).

Reverse forwards (``tcpip-forward``, ``ssh -R``) and unix-socket forwards are always
refused (:data:`REVERSE_REFUSED`, :data:`STREAMLOCAL_REFUSED`): the Kubernetes API has
no way to listen inside a pod and no port-forward to a unix socket.

A host is substituted into a pod-side argv only if it looks like a host name or an IP
literal and does not start with ``-`` (``nc -e...`` must not become an option), so the
command never sees anything else.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

FORWARDING_MODES = ("enable", "disable")
"""Values of ``security.forwarding.forwardingMode``."""

FORWARDING_DISABLED = "forwarding is disabled on this gateway"
REVERSE_REFUSED = ("remote forwarding (ssh -R) is not supported: Kubernetes has no reverse "
                   "port-forward into a pod")
STREAMLOCAL_REFUSED = ("unix socket forwarding is not supported: the Kubernetes port-forward "
                       "API reaches TCP ports only")

LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost",
                         "127.0.0.1", "::1"})
"""Destination host names that mean "the pod itself" (besides its name and IPs)."""

PLACEHOLDERS = ("{host}", "{port}")
_PLACEHOLDER = re.compile(r"\{[^{}]*\}")
_HOSTNAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252})")


@attrs.frozen
class ForwardingPolicy:
    """What ``security.forwarding`` allows (library form; default: nothing)."""

    enabled: bool = False
    """``forwardingMode: enable``: direct-tcpip to the pod itself is served."""
    pod_network_command: tuple[str, ...] | None = None
    """argv run in the pod for other destinations (``{host}``/``{port}`` substituted);
    None: other destinations are refused."""
    open_settle: float = 0.2
    """Seconds a new port-forward stream may take to report a failed dial on its error
    channel before the SSH channel is accepted (the protocol never confirms a dial)."""


@attrs.frozen
class PodAddress:
    """What names the pod: its name and IPs (from its status)."""

    name: str
    ips: tuple[str, ...] = ()

    @classmethod
    def of(cls, name: str, pod: dict[str, Any]) -> PodAddress:
        status = pod.get("status") or {}
        ips = [str(entry.get("ip", "")) for entry in status.get("podIPs") or []
               if isinstance(entry, dict)]
        if status.get("podIP"):
            ips.append(str(status["podIP"]))
        return cls(name, tuple(ip for ip in dict.fromkeys(ips) if ip))


@attrs.frozen
class ViaPortForward:
    port: int


@attrs.frozen
class ViaPodNetwork:
    argv: tuple[str, ...]


@attrs.frozen
class Refused:
    reason: str


Verdict = ViaPortForward | ViaPodNetwork | Refused


def _normal(host: str) -> str:
    host = host.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def is_pod_itself(host: str, pod: PodAddress) -> bool:
    """Whether ``host`` names the pod (loopback, its name, one of its IPs)."""
    name = _normal(host)
    if name in LOCAL_NAMES or name == pod.name.lower():
        return True
    return name in {_normal(ip) for ip in pod.ips}


def safe_host(host: str) -> bool:
    """A host name or IP literal that can be an argv element of a network command."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return bool(_HOSTNAME.fullmatch(host))


def judge(policy: ForwardingPolicy, host: str, port: int, pod: PodAddress) -> Verdict:
    """How (or whether) to carry a ``direct-tcpip`` channel to ``host:port``."""
    if not policy.enabled:
        return Refused(FORWARDING_DISABLED)
    if not 1 <= port <= 65535:
        return Refused(f"port {port} is not a TCP port (1..65535)")
    if is_pod_itself(host, pod):
        return ViaPortForward(port)
    if policy.pod_network_command is None:
        return Refused("only the pod itself (localhost) can be reached; "
                       "security.forwarding.podNetworkCommand is not set")
    if not safe_host(host):
        return Refused("the destination is not a host name or IP address")
    return ViaPodNetwork(pod_network_argv(policy.pod_network_command, host, port))


def pod_network_argv(template: Sequence[str], host: str, port: int) -> tuple[str, ...]:
    """``template`` with ``{host}`` and ``{port}`` substituted in every element."""
    return tuple(part.replace("{host}", host).replace("{port}", str(port))
                 for part in template)


def command_problems(argv: Iterable[object]) -> list[str]:
    """What is wrong with a ``podNetworkCommand`` (empty list: nothing)."""
    items = list(argv)
    if not items:
        return ["must name a program, e.g. [nc, \"{host}\", \"{port}\"]"]
    problems = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            problems.append(f"element {i} must be a string")
            continue
        unknown = [p for p in _PLACEHOLDER.findall(item) if p not in PLACEHOLDERS]
        if unknown:
            problems.append(f"element {i}: unknown placeholder {unknown[0]} "
                            "(only {host} and {port})")
    text = " ".join(str(i) for i in items)
    if not problems and ("{host}" not in text or "{port}" not in text):
        problems.append("must contain {host} and {port}")
    return problems


@attrs.frozen
class AgentOptions:
    """``security.forwarding`` as far as the agent goes (``ssh -A``; gateway/agent.py)."""

    enabled: bool = False
    """``agentForwardingMode: enable``."""
    max_connections: int = 8
    """Agent connections carried at once per SSH connection."""
