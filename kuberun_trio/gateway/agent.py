"""Agent forwarding (``ssh -A``): a relay in the pod, one exec per agent connection.

Theory of operation
-------------------
With ``security.forwarding.agentForwardingMode: enable`` the gateway accepts a session's
``auth-agent-req@openssh.com`` (before its shell/exec; refused, and logged, when the mode
is ``disable``). Like sshd, a connection gets one relay, started on the first such
request and kept until the connection ends; every session that asked gets
``SSH_AUTH_SOCK`` in its environment::

    connection nursery
    ├── relay task          one pods/exec: the listener (LISTENER_SCRIPT), until the end
    └── agent connection xK one pods/exec each + one auth-agent@openssh.com channel

The listener, a few lines of POSIX ``sh`` (every value passed as an argv element, never
parsed by a shell), makes a private directory under ``/tmp`` (a random name from the
gateway, ``mkdir -m 700`` which fails if it exists: mkdtemp's semantics), sets
``umask 0177`` (sockets 0600), and starts

* ``socat`` if the image has it: ``UNIX-LISTEN:DIR/agent,fork`` runs
  :data:`SOCAT_CHILD_SCRIPT` per accepted connection, which prints ``kuberun-agent conn
  N`` on stderr (the relay exec's stderr) and listens once on ``DIR/cN``;
* otherwise ``python3`` (:data:`PYTHON_LISTENER`): the same, threads instead of forks;
* otherwise it prints ``kuberun-agent none``: the session hears
  :data:`TOOLS_MISSING` on stderr and goes on without ``SSH_AUTH_SOCK``.

It prints ``kuberun-agent ready TOOL`` once the socket exists (sessions wait for that, at
most ``timeouts.commandStart``, before their exec opens), then waits for stdin EOF (how a
real kubelet tells it the gateway is gone; the embedded cluster kills the exec's process
group) and removes the directory. For each ``conn N`` the gateway opens an
``auth-agent@openssh.com`` channel to the client and then a second exec that connects
to ``DIR/cN`` (``socat -`` / :data:`PYTHON_CONNECT`, retrying while the pod side gets
ready): so concurrent agent connections each have their own stream. At most
``security.forwarding.maxAgentConnections`` run at once: the pod side accepts no more
(socat's ``max-children``, a semaphore in python), so further agent clients wait in the
listen backlog until one ends. The gateway counts too, in case something in the pod writes
``conn`` lines of its own: one announced while the limit is reached waits for a slot (the
pod side frees its slot a moment before the gateway's exec ends), up to as many again; one
more is refused (logged), and the pod side gives up on it after :data:`CONNECT_WAIT` s.

Every task lives in the connection's nursery, so the relay's and the bridges' exec
streams are closed before the pod DELETE, like the sessions'.

Anyone who can reach the socket in the pod (the pod's user, or root in the pod) can use
the client's agent while the connection lasts -- sign with its keys, not read them.
"""

from __future__ import annotations

import collections
import logging
import re
import secrets
from typing import TYPE_CHECKING, Any, Final

import trio

from ..aio import agentrelay
from ..aio.bridge import run_aio
from ..core.audit import ConnectionAudit
from ..core.forwarding import AgentOptions
from ..errors import client_message

if TYPE_CHECKING:
    from ..aio.sshsession import ExecTarget

log = logging.getLogger(__name__)

TOOLS_MISSING: Final = "agent forwarding needs socat or python3 in the image"
"""What a session reads on stderr when the image has neither relay tool."""
DIRECTORY_PREFIX: Final = "/tmp/kuberun-agent-"
CONNECT_WAIT: Final = 10
"""Seconds the pod side waits for the gateway's per-connection exec."""
TOOLS: Final = ("socat", "python3")

LISTENER_SCRIPT: Final = """\
d=$1
if command -v socat >/dev/null 2>&1; then
  t=socat
elif command -v python3 >/dev/null 2>&1; then
  t=python3
else
  echo "kuberun-agent none"
  exit 3
fi
umask 0177
mkdir -m 700 -- "$d" 2>/dev/null || { echo "kuberun-agent failed cannot create $d"; exit 4; }
trap 'rm -rf -- "$d" 2>/dev/null' EXIT
trap 'exit 129' HUP
trap 'exit 143' TERM
if [ "$t" = socat ]; then
  printf '%s\\n' "$2" >"$d/conn"
  socat UNIX-LISTEN:"$d/agent",fork,max-children="$4" EXEC:"/bin/sh $d/conn" \
    </dev/null >/dev/null &
else
  python3 -c "$3" "$d" "$4" </dev/null >/dev/null &
fi
p=$!
while [ ! -S "$d/agent" ]; do
  kill -0 "$p" 2>/dev/null || { echo "kuberun-agent failed $t exited"; exit 5; }
  sleep 0.05 2>/dev/null || sleep 1
done
echo "kuberun-agent ready $t"
while read -r _; do :; done
kill "$p" 2>/dev/null
if kill -s 0 -- "-$$" 2>/dev/null; then
  trap '' TERM
  kill -s TERM -- "-$$" 2>/dev/null
fi
exit 0
"""
"""The relay's listener (``sh -c LISTENER_SCRIPT kuberun-agent DIR CHILD PYTHON MAX``)."""

SOCAT_CHILD_SCRIPT: Final = f"""\
printf 'kuberun-agent conn %s\\n' "$$" >&2
exec socat -t 0.1 - UNIX-LISTEN:"${{0%/*}}/c$$",listen-timeout={CONNECT_WAIT}
"""
"""Run by socat (``/bin/sh DIR/conn``) for each accepted agent connection (its stdio).
``-t 0.1``: once one side has ended, the other has nowhere left to send to (socat's
default waits 0.5 s, which holds the connection's slot that long)."""

PYTHON_LISTENER: Final = f"""\
import os, socket, sys, threading
d = sys.argv[1]
def pump(a, b):
    try:
        while True:
            data = a.recv(65536)
            if not data:
                break
            b.sendall(data)
    except OSError:
        pass
    try:
        b.shutdown(socket.SHUT_WR)
    except OSError:
        pass
slots = threading.BoundedSemaphore(int(sys.argv[2]))
def serve(c, n):
    try:
        carry(c, n)
    finally:
        slots.release()
def carry(c, n):
    p = '%s/c%d' % (d, n)
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(p)
        s.listen(1)
        s.settimeout({CONNECT_WAIT})
        os.write(2, b'kuberun-agent conn %d\\n' % n)
        g = s.accept()[0]
    except OSError:
        c.close()
        return
    finally:
        s.close()
        try:
            os.unlink(p)
        except OSError:
            pass
    g.settimeout(None)
    t = threading.Thread(target=pump, args=(g, c), daemon=True)
    t.start()
    pump(c, g)
    t.join()
    c.close()
    g.close()
s = socket.socket(socket.AF_UNIX)
s.bind(d + '/agent')
s.listen(64)
n = 0
while True:
    slots.acquire()
    c = s.accept()[0]
    n += 1
    threading.Thread(target=serve, args=(c, n), daemon=True).start()
"""
"""The python3 listener (``python3 -c PYTHON_LISTENER DIR MAX``): same protocol as socat's."""

PYTHON_CONNECT: Final = """\
import os, socket, sys, threading, time
s = socket.socket(socket.AF_UNIX)
for i in range(200):
    try:
        s.connect(sys.argv[1])
        break
    except OSError:
        time.sleep(0.05)
else:
    sys.exit('kuberun-agent: cannot connect to ' + sys.argv[1])
def up():
    try:
        while True:
            data = os.read(0, 65536)
            if not data:
                break
            s.sendall(data)
        s.shutdown(socket.SHUT_WR)
    except OSError:
        pass
threading.Thread(target=up, daemon=True).start()
while True:
    data = s.recv(65536)
    if not data:
        break
    while data:
        data = data[os.write(1, data):]
"""
"""One agent connection's exec (``python3 -c PYTHON_CONNECT DIR/cN``)."""

_LINE = re.compile(r"kuberun-agent (ready|none|failed|conn)(?: (.{0,200}))?")


def relay_directory() -> str:
    """A fresh private directory name for one connection's relay."""
    return DIRECTORY_PREFIX + secrets.token_hex(12)


def listener_argv(directory: str, max_connections: int = 8,
                  shell: str = "/bin/sh") -> tuple[str, ...]:
    """The relay exec's argv."""
    return (shell, "-c", LISTENER_SCRIPT, "kuberun-agent", directory, SOCAT_CHILD_SCRIPT,
            PYTHON_LISTENER, str(max_connections))


def connect_argv(tool: str, directory: str, number: int) -> tuple[str, ...]:
    """The argv of the exec that carries agent connection ``number`` (no shell)."""
    path = f"{directory}/c{number}"
    if tool == "socat":
        return ("socat", "-t", "0.1", "-", f"UNIX-CONNECT:{path},retry=200,interval=0.05")
    return ("python3", "-c", PYTHON_CONNECT, path)


def parse_line(line: str) -> tuple[str, str] | None:
    """A protocol line of the relay as (kind, argument), or None for anything else."""
    match = _LINE.fullmatch(line.strip())
    return (match[1], match[2] or "") if match else None


class AgentRelay:
    """One connection's agent relay (see the module docstring). Trio-flavoured."""

    def __init__(self, options: AgentOptions, audit: ConnectionAudit, *,
                 start_timeout: float) -> None:
        self.options = options
        self.audit = audit
        self.start_timeout = start_timeout
        self.directory = relay_directory()
        self.socket_path = f"{self.directory}/agent"
        self.tool: str | None = None
        """``socat`` or ``python3`` once the relay listens."""
        self.problem: str | None = None
        """Why the relay is not there (for the sessions' stderr)."""
        self.active = 0
        """Agent connections being carried now."""
        self.carried = 0
        """Agent connections carried so far."""
        self._ready = trio.Event()
        self._waiting: collections.deque[int] = collections.deque()
        self._nursery: trio.Nursery | None = None
        self._target: ExecTarget | None = None
        self._ssh: Any = None

    def __repr__(self) -> str:
        return f"<AgentRelay {self.socket_path} {self.tool or self.problem or 'starting'}>"

    async def run(self, target: ExecTarget, ssh_connection: Any, nursery: trio.Nursery) -> None:
        """Run the relay exec until it ends or the connection ends (cancelled)."""
        self._target, self._ssh, self._nursery = target, ssh_connection, nursery
        try:
            await trio.lowlevel.checkpoint_if_cancelled()  # teardown began: open no exec
            result = await run_aio(agentrelay.run_relay, target,
                                   listener_argv(self.directory,
                                                 self.options.max_connections), self._line)
            if not self._ready.is_set():
                self._failed(f"the relay ended (exit status {result.exit_code})",
                             result.message)
            else:  # it listened, and is gone while the connection lives (killed in the pod)
                self.tool, self.problem = None, "the agent relay in the pod has ended"
                self.audit.emit(logging.WARNING, "agent-forwarding-failed",
                                "agent forwarding: %s", self.problem, reason=self.problem,
                                error=result.message[:500])
        except Exception as exc:  # the relay's error boundary: sessions go on without it
            self._failed(f"agent forwarding could not start: {client_message(exc)}", str(exc))
        finally:
            self._ready.set()

    def _failed(self, problem: str, detail: str = "") -> None:
        if self.problem is None and self.tool is None:
            self.problem = problem
            self.audit.emit(logging.WARNING, "agent-forwarding-failed",
                            "agent forwarding failed: %s", problem, reason=problem,
                            error=detail[:500])
        self._ready.set()

    def _line(self, stream: str, line: str) -> None:
        """One line of relay output (synchronous: called on the asyncio side)."""
        parsed = parse_line(line)
        if parsed is None:
            log.debug("agent relay %s: %s", stream, line[:200],
                      extra={"event": "agent-relay-output", **self.audit.fields})
            return
        kind, arg = parsed
        if kind == "ready" and arg in TOOLS and self.tool is None:
            self.tool = arg
            self._ready.set()
            self.audit.emit(logging.INFO, "agent-forwarding-started",
                            "agent forwarding: relay (%s) listening on %s", arg,
                            self.socket_path, tool=arg, socket=self.socket_path)
        elif kind == "none":
            self._failed(TOOLS_MISSING)
        elif kind == "failed":
            self._failed(f"agent forwarding could not start: {arg}")
        elif kind == "conn" and arg.isdigit() and len(arg) <= 10 and self.tool is not None:
            self._accepted(int(arg))

    def _accepted(self, number: int) -> None:
        if self._nursery is None or self.tool is None:
            return
        if self.active < self.options.max_connections:
            self.active += 1
            self._nursery.start_soon(self._carry, number, self.tool)
        elif len(self._waiting) < self.options.max_connections:
            # The pod side frees a slot when its end closes, a moment before our exec's
            # status arrives: the next one waits here for that moment.
            self._waiting.append(number)
        else:
            self.audit.refused("agent-connection", f"more than "
                               f"{self.options.max_connections} agent connections at once "
                               "(security.forwarding.maxAgentConnections)")

    async def _carry(self, number: int, tool: str) -> None:
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            if self._target is None:  # cannot happen: set before any line arrives
                return
            how = await run_aio(agentrelay.bridge_connection, self._ssh, self._target,
                                connect_argv(tool, self.directory, number))
            self.carried += 1
            log.debug("agent connection %d: %s", number, how,
                      extra={"event": "agent-connection", **self.audit.fields,
                             "outcome": how})
        except Exception as exc:  # one agent connection's error boundary
            self.audit.emit(logging.WARNING, "agent-connection-failed",
                            "agent connection %d failed: %s", number, exc,
                            error=f"{type(exc).__name__}: {exc}"[:500])
        finally:
            self.active -= 1
            if self._waiting and self._nursery is not None and self.tool is not None:
                self.active += 1
                self._nursery.start_soon(self._carry, self._waiting.popleft(), self.tool)

    async def socket_for_session(self) -> str | None:
        """The socket path once the relay listens; None (and :attr:`problem`) if it cannot."""
        with trio.move_on_after(self.start_timeout):
            await self._ready.wait()
        if self.tool is None and self.problem is None:
            self._failed(f"agent forwarding did not start within {self.start_timeout:g} s")
        return self.socket_path if self.tool is not None else None
