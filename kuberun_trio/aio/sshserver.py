"""The connection side of the SSH gateway: asyncssh's server, its listener and host keys.

Theory of operation
-------------------
asyncssh calls :class:`GatewaySSHServer` (one per TCP connection) synchronously from its
protocol machinery; only its authentication hooks are coroutines, and they reach the
trio side's :class:`~kuberun_trio.gateway.login.LoginGate` and ``configure`` hook through
:func:`~.bridge.run_trio`. Once the login is complete the trio core hands the connection
its :class:`~.sshsession.ConnectionPortal` (``make_portal``); every session channel it then
opens is a :class:`~.sshsession.GatewayChannel` driven by a
:class:`~.sshsession.GatewaySession` (:mod:`.sshsession`: channel requests, flow control,
the exec pump). This module depends on :mod:`.sshsession`, never the reverse.

Limits (:mod:`kuberun_trio.core.limits` decides, this module carries out):
a TCP connection is admitted in :meth:`GatewaySSHServer.connection_made` or
disconnected right after the version exchange, before any key exchange is
computed; the login grace timer runs from there to ``auth_completed``, where
the login is counted for its user (or refused with a disconnect); session
channels over ``maxSessions`` fail to open with the reason; each session gets a
:class:`~kuberun_trio.core.limits.SignalBucket` for its signals. Keepalive
probes are asyncssh's (``keepalive_interval``/``keepalive_count_max``).

Per-connection settings (``GatewayOptions.configure``, :mod:`kuberun_trio.core.connsettings`):
once a credential is proven and the user's limits passed, :meth:`GatewaySSHServer._configured`
resets the login's throttle keys and awaits the hook before the client hears "logged in",
so every channel sees :attr:`GatewaySSHServer.settings`; a refusal disconnects with the
reason, as a per-user limit does.

Audit: every TCP connection gets a :class:`~kuberun_trio.core.audit.ConnectionAudit`
on ``connection_made`` (``connection-accepted``); ``connection_lost`` before login writes
``pre-auth-end``. Forwarding: with ``security.forwarding.forwardingMode: enable`` a
``direct-tcpip`` open (``ssh -L``/``-D``) goes to :func:`.sshforward.accept_forward` and
the trio side; otherwise it is refused with ``administratively prohibited`` (not
asyncssh's misleading ``Connection refused``). ``direct-streamlocal`` opens and
``tcpip-forward`` (``ssh -R``: Kubernetes has no reverse port-forward) /
``streamlocal-forward`` always fail -- each with a ``request-refused`` line (``x11-req``
and ``auth-agent-req`` are session requests: :mod:`.sshsession`).

:func:`listen` / :func:`close_listener` start and stop the asyncssh acceptor with
:data:`SSH_OPTIONS`; :func:`load_host_key` and friends handle host keys.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import asyncssh
from asyncssh.constants import OPEN_ADMINISTRATIVELY_PROHIBITED
from asyncssh.public_key import decode_ssh_public_key

from ..core.audit import AuditPolicy, ConnectionAudit, format_address
from ..core.auth import AuthResult
from ..core.connsettings import (
    CANNOT_CONFIGURE,
    ConfigRefused,
    Configure,
    ConnectionSettings,
    LoginInfo,
)
from ..core.forwarding import (
    FORWARDING_DISABLED,
    REVERSE_REFUSED,
    STREAMLOCAL_REFUSED,
    ForwardingPolicy,
)
from ..core.limits import Admission, SignalBucket, Ticket, open_fds, report_refusal
from ..core.limits import Refusal as LimitRefusal
from ..core.refusals import Refusal
from ..observe.metrics import GatewayMetrics, unobserved
from .bridge import run_trio
from .linger import Lingering, linger_on_abort
from .sshforward import accept_forward
from .sshsession import ConnectionPortal, GatewayChannel, GatewaySession

if TYPE_CHECKING:
    from ..gateway.login import LoginGate  # the trio-side gate it is handed

log = logging.getLogger(__name__)

DROP_AFTER = 2.0
"""Seconds a connection from a penalized address is held (never read) before it is
closed: an attacker whose connections were closed at once would only reconnect faster."""


class GatewayServerConnection(asyncssh.SSHServerConnection):
    """asyncssh's server connection, telling a signed public key request from a query.

    ``SSHServer.validate_public_key`` is asked the same question for both; only here is it
    known whether a signature came along, and the limiter's turn must come before the key
    and its signature are checked (:meth:`GatewaySSHServer.key_attempt`).
    """

    async def validate_public_key(self, username: str, key_data: bytes, msg: bytes,
                                  signature: bytes) -> bool:
        owner = self._owner
        assert isinstance(owner, GatewaySSHServer)
        validate = functools.partial(asyncssh.SSHServerConnection.validate_public_key, self)
        return await owner.key_attempt(username, key_data, msg, signature, validate)


class GatewaySSHServer(asyncssh.SSHServer):
    """One SSH connection: authentication hooks and session channels.

    Authentication goes through the gateway's :class:`~kuberun_trio.gateway.login.LoginGate`
    (limiter turn first, then the credential; only a proven login completes it). With an
    :class:`~kuberun_trio.core.limits.Admission`, the connection is admitted (or dropped
    at once) when TCP connects, must log in within ``loginGraceTime``, is counted for its
    user once the login is proven, and opens sessions and signals within limits.
    """

    _chan_ids = itertools.count()

    def __init__(self, make_portal: Callable[[GatewaySSHServer], ConnectionPortal],
                 auth: LoginGate, connection_id: str, admission: Admission | None = None, *,
                 audit_policy: AuditPolicy | None = None,
                 metrics: GatewayMetrics | None = None,
                 forwarding: ForwardingPolicy | None = None,
                 lingering: Lingering | None = None,
                 configure: Configure | None = None) -> None:
        self._make_portal = make_portal
        self.forwarding = forwarding or ForwardingPolicy()
        """``security.forwarding``: whether direct-tcpip channels are served at all."""
        self.lingering = lingering
        """Where this connection's socket goes to close gracefully (None: asyncssh's abort)."""
        self._configure = configure
        self.settings: ConnectionSettings | None = None
        """The connection's own settings (``configure``'s answer), once logged in."""
        self.metrics = metrics or unobserved()
        self._failed_auths = 0
        """Failed login attempts (a connection that ends with some counts as rejected)."""
        """Credentials refused on this connection."""
        self.auth = auth
        """The gateway's login gate (trio-flavoured)."""
        self.connection_id = connection_id
        self.audit = ConnectionAudit(connection_id, "?", audit_policy)
        """The connection's audit record (its address is filled in on connection_made)."""
        self.auth_result: Any = None
        self.conn: asyncssh.SSHServerConnection | None = None
        self.portal: ConnectionPortal | None = None
        self.username = ""
        """The SSH username; after login, the authenticated user's name."""
        self.peer: tuple[str, int] = ("", 0)
        self.login = auth.connection(connection_id, "", 0)
        self._key_check: AuthResult | Refusal | None = None
        self._signed = False
        self.admission = admission
        self.ticket: Ticket | None = None
        self._grace_timer: asyncio.TimerHandle | None = None
        self._end_reason: str | None = None
        """Why the gateway itself ended the connection before login (for ``pre-auth-end``)."""

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        conn.__class__ = GatewayServerConnection  # overrides one method, adds no state
        self.conn = conn
        peer = conn.get_extra_info("peername") or ("", 0)
        self.peer = (str(peer[0]), int(peer[1]))
        self.audit.remote_address = format_address(*self.peer)
        self.audit.accepted()
        self.audit.on_refused = self.metrics.request_refused
        self.metrics.connection_opened()
        self.login = self.auth.connection(self.connection_id, *self.peer)
        if not self.auth.admit_connection(self.login):  # before the costly key exchange
            self._end_reason = "dropped: too many failed logins from this address"
            self.metrics.connection_rejected("auth-throttled")
            transport = conn._transport  # asyncssh offers no public pause
            if transport is not None:
                transport.pause_reading()
            asyncio.get_running_loop().call_later(DROP_AFTER, conn.abort)
            return
        if self.lingering is not None:  # from now on the client reads why it is closed
            linger_on_abort(conn, self.lingering)
        if self.admission is None:
            return
        verdict = self.admission.accept(self.peer[0], open_fds())
        if isinstance(verdict, LimitRefusal):
            # Called before asyncssh sends its version: disconnect right after it, before
            # any key exchange is computed (MSG_DISCONNECT may precede KEXINIT).
            self.refused(verdict)
            asyncio.get_running_loop().call_soon(self._disconnect, verdict)
            return
        self.ticket = verdict
        grace = self.admission.limits.login_grace_time
        self._grace_timer = asyncio.get_running_loop().call_later(
            grace, self._grace_expired, grace)

    def _grace_expired(self, grace: float) -> None:
        self._grace_timer = None
        if self.ticket is not None and self.ticket.authenticating:
            refusal = LimitRefusal("login-grace-time", f"no login within {grace:g} s")
            self.refused(refusal)
            self._disconnect(refusal, asyncssh.DISC_BY_APPLICATION)

    def refused(self, refusal: LimitRefusal) -> None:
        """Log a refusal of this connection (or of one of its requests)."""
        host, port = self.peer
        report_refusal(refusal, connection_id=self.connection_id, client=f"{host}:{port}",
                       username=self.username)
        if refusal.scope != "connection":  # connections are counted where they are dropped
            self.metrics.request_refused(refusal.reason)

    def _disconnect(self, refusal: LimitRefusal,
                    code: int = asyncssh.DISC_TOO_MANY_CONNECTIONS) -> None:
        if self._end_reason is None:
            self._end_reason = ("login grace time exceeded" if refusal.reason == "login-grace-time"
                                else f"refused ({refusal.reason}): {refusal.message}")
        self.metrics.connection_rejected(refusal.reason)
        if self.conn is not None:
            self.conn.disconnect(code, f"kuberun: {refusal.message}")

    def _user_refused(self, username: str) -> bool:
        """The user's limits, checked once a credential is proven: say so now, not later.

        The user is the authenticated one (an auth webhook's ``authenticatedUsername``), as
        :meth:`auth_completed` counts it, not the SSH login name."""
        if self.admission is None:
            return False
        proof = self.login.proof
        user = (proof.result.username if proof is not None else None) or username
        refusal = self.admission.user_refusal(user)
        if refusal is None:
            return False
        self.auth.completed(self.login, username)  # the credential is proven all the same
        self.refused(refusal)
        self._disconnect(refusal)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        reason = lost_reason(exc)
        if exc is not None and not isinstance(exc, asyncssh.Error | OSError):
            # asyncssh closes a connection whose callback raised, and logs it at debug
            # level only: a bug in the gateway must show in the audit trail.
            self.audit.emit(logging.ERROR, "connection-error", "connection %s: %s",
                            self.connection_id, reason, exc_info=exc, reason=reason)
        if self._grace_timer is not None:
            self._grace_timer.cancel()
            self._grace_timer = None
        if self.ticket is not None:
            self.ticket.release()
            if exc is not None and "keepalive" in str(exc):
                self.refused(LimitRefusal("client-alive",
                                          "the client stopped answering keepalives"))
        if self.conn is not None:
            self.metrics.connection_closed(authenticated=self.portal is not None)
            if self.portal is None and self._failed_auths:
                self.metrics.connection_rejected("auth")
        if self.portal is not None:
            self.audit.lost_reason = reason
            self.portal.closed()
        else:
            self.audit.pre_auth_end(self._end_reason or reason, username=self.username)

    def begin_auth(self, username: str) -> bool:
        self.username = username
        return True  # authentication is always required

    def public_key_auth_supported(self) -> bool:
        return "publickey" in self.auth.methods()

    def password_auth_supported(self) -> bool:
        return "password" in self.auth.methods()

    def _refused(self, refusal: Refusal, authtype: str = "pubkey") -> None:
        """Act on a refusal of the login gate (asyncssh then sends the failure reply)."""
        self._failed_auths += 1
        self.metrics.auth_result(authtype, accepted=False)
        if refusal.banner and self.conn is not None:
            self.conn.send_auth_banner(refusal.banner)
        if refusal.disconnect is not None:
            raise asyncssh.PermissionDenied(refusal.disconnect)

    async def key_attempt(self, username: str, key_data: bytes, msg: bytes, signature: bytes,
                          validate: Callable[[str, bytes, bytes, bytes], Awaitable[bool]],
                          ) -> bool:
        """A public key request: a query (no ``msg``) or a signed attempt.

        A signed attempt first waits for its turn; asyncssh then asks
        :meth:`validate_public_key` and verifies the signature.
        """
        self._key_check, self._signed = None, bool(msg)
        if msg:
            refusal = await run_trio(self.auth.turn, self.login, username, "publickey")
            if refusal is not None:
                self._refused(refusal)
                return False
        ok = await validate(username, key_data, msg, signature)
        check, self._key_check = self._key_check, None
        if isinstance(check, Refusal):
            self._refused(check)
            return False
        if not msg:
            if check is None:  # not a key asyncssh could read
                self._refused(self.auth.offer_failed(self.login, username))
            return ok
        fingerprint = _fingerprint(key_data)
        if ok and check is not None:
            self.auth.proven_key(self.login, check, fingerprint)
            return not self._user_refused(username) and await self._configured(username)
        self._refused(self.auth.bad_signature(self.login, username, fingerprint)
                      if check is not None else
                      self.auth.failed(self.login, username, "publickey"))
        return False

    async def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        line = key.export_public_key("openssh").decode().strip()
        self._key_check = await run_trio(self.auth.check_key, self.login, username, line,
                                         signed=self._signed)
        return isinstance(self._key_check, AuthResult)

    async def validate_password(self, username: str, password: str) -> bool:
        outcome = await run_trio(self.auth.password, self.login, username, password)
        if isinstance(outcome, Refusal):
            self._refused(outcome, "password")
            return False
        return not self._user_refused(username) and await self._configured(username)

    async def _configured(self, username: str) -> bool:
        """Decide the connection's settings (``configure``) once the credential is proven.

        The limiter's keys are reset first, so that a slow hook holds no other login's
        turn. A refusal is told in the disconnect message (like a per-user limit)."""
        if self._configure is None or self.conn is None:
            return True
        self.auth.proven(self.login, username)
        proof = self.login.proof
        result = proof.result if proof is not None else AuthResult()
        info = LoginInfo(self.connection_id, username, result.username or username,
                         self.login.remote_address,
                         str(self.conn.get_extra_info("client_version") or ""), result)
        try:
            self.settings = await run_trio(self._configure, info)
            return True
        except ConfigRefused as exc:
            told, detail = exc.client_message, exc.detail
        except Exception as exc:  # a bug in an embedder's hook refuses this login only
            told, detail = CANNOT_CONFIGURE, f"{type(exc).__name__}: {exc}"
            log.exception("configure hook failed", extra={
                "event": "config-error", **self.audit.fields})
        self.auth.completed(self.login, username)  # the credential is proven all the same
        self.audit.emit(logging.WARNING, "config-refused", "connection %s: login refused: %s",
                        self.connection_id, detail, reason=told, error=detail,
                        username=result.username or username)
        self._end_reason = f"refused (config): {told}"
        self.metrics.connection_rejected("config")
        if self.conn is not None:
            self.conn.disconnect(asyncssh.DISC_BY_APPLICATION,
                                 f"kuberun: {told} (connection {self.connection_id})")
        return False

    def auth_completed(self) -> None:
        if self._grace_timer is not None:
            self._grace_timer.cancel()
            self._grace_timer = None
        result = self.auth.completed(self.login, self.username)
        if result is None:  # no proven credential (cannot happen through asyncssh's methods)
            if self.conn is not None:
                self.conn.close()
            return
        self.auth_result = result
        if result.username is not None:
            self.username = result.username
        self.audit.username = self.username
        self.metrics.handshake_succeeded()
        self.metrics.auth_result("password" if result.method == "password" else "pubkey",
                                 accepted=True)
        if self.settings is not None and self.settings.forwarding is not None:
            self.forwarding = self.settings.forwarding  # this connection's own
        if self.ticket is not None and self.settings is not None:
            self.ticket.max_sessions = self.settings.max_sessions
        if self.ticket is not None and self.conn is not None:
            refusal = self.ticket.authenticated(self.username)
            if refusal is not None:
                self.refused(refusal)
                self._disconnect(refusal)
                return
        self.portal = self._make_portal(self)

    def session_requested(self) -> Any:
        if self.portal is None or self.conn is None:
            return False
        ticket, signals = self.ticket, None
        if ticket is not None and self.admission is not None:
            refusal = ticket.open_session()
            if refusal is not None:
                self.refused(refusal)
                raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                                f"kuberun: {refusal.message}")
            own = self.settings.max_signals_per_second if self.settings is not None else None
            signals = SignalBucket(own or self.admission.limits.max_signals_per_second)
        machine = self.portal.new_session(next(self._chan_ids))
        chan = self.conn.create_server_channel(encoding=None)
        chan.__class__ = GatewayChannel  # adds request handlers only, no state
        return chan, GatewaySession(self.portal, machine, self.audit, signals=signals,
                                    refused=self.refused,
                                    on_close=ticket.close_session if ticket else None,
                                    counts=self.metrics.bytes)

    # -- forwarding: direct-tcpip when enabled (sshforward.py); the rest refused, logged,
    # and said so ("administratively prohibited") ---------------------------------------
    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str,
                             orig_port: int) -> Any:
        if self.forwarding.enabled and self.portal is not None and self.conn is not None:
            return accept_forward(self.conn, self.audit, self.portal.submit_forward,
                                  dest_host, dest_port, ticket=self.ticket,
                                  refused=self.refused, counts=self.metrics.bytes)
        self.audit.refused("port-forwarding", FORWARDING_DISABLED, kind="direct-tcpip",
                           destination=format_address(dest_host[:256], dest_port))
        raise asyncssh.ChannelOpenError(OPEN_ADMINISTRATIVELY_PROHIBITED, FORWARDING_DISABLED)

    def unix_connection_requested(self, dest_path: str) -> Any:
        reason = STREAMLOCAL_REFUSED  # never possible, whatever the configuration says
        self.audit.refused("port-forwarding", reason,
                           kind="direct-streamlocal", destination=dest_path[:256])
        raise asyncssh.ChannelOpenError(OPEN_ADMINISTRATIVELY_PROHIBITED, reason)

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        reason = REVERSE_REFUSED  # never possible, whatever the configuration says
        self.audit.refused("port-forwarding", reason, kind="tcpip-forward",
                           listen=format_address(listen_host[:256], listen_port))
        return False

    def unix_server_requested(self, listen_path: str) -> bool:
        reason = STREAMLOCAL_REFUSED  # never possible, whatever the configuration says
        self.audit.refused("port-forwarding", reason,
                           kind="streamlocal-forward", listen=listen_path[:256])
        return False

    def close(self, message: str = "") -> None:
        if self.conn is not None:
            self.conn.close()


def _fingerprint(key_data: bytes) -> str:
    try:
        return str(decode_ssh_public_key(key_data).get_fingerprint("sha256"))
    except asyncssh.KeyImportError:
        return "?"


def lost_reason(exc: Exception | None) -> str:
    """Why the SSH connection went away, from asyncssh's ``connection_lost`` argument."""
    if exc is None:
        return "client disconnected"
    text = str(exc).strip()
    if isinstance(exc, asyncssh.ConnectionLost):
        if "login timeout" in text.lower():
            return "login grace time exceeded"
        if "keepalive" in text.lower():
            return "client not responding to keepalive"
        return "client disconnected"
    if isinstance(exc, asyncssh.DisconnectError):
        return f"disconnected: {text[:200]}" if text else "disconnected"
    if isinstance(exc, OSError):
        return f"connection lost: {type(exc).__name__}"
    return f"internal error in the gateway: {type(exc).__name__}"


SSH_OPTIONS: dict[str, Any] = {
    # aes-gcm first: 1.3-1.7x faster than chacha20-poly1305 here (shared/PITFALLS.md).
    "encryption_algs": ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
                        "chacha20-poly1305@openssh.com", "aes128-ctr", "aes256-ctr"],
    "allow_pty": True,
    "line_editor": False,  # the pod's pty does the editing and echo
    "x11_forwarding": False,
    "agent_forwarding": False,
    "allow_scp": False,  # scp runs inside the pod like any other exec
}


async def listen(host: str, port: int, *, host_keys: list[Any],
                 server_factory: Callable[[], asyncssh.SSHServer],
                 options: Mapping[str, Any] | None = None) -> asyncssh.SSHAcceptor:
    """Start the SSH listener. Asyncio-flavoured."""
    return await asyncssh.create_server(
        server_factory, host, port, server_host_keys=host_keys,
        **{**SSH_OPTIONS, **(options or {})})


async def close_listener(acceptor: asyncssh.SSHAcceptor) -> None:
    """Stop accepting (existing connections stay). Asyncio-flavoured."""
    acceptor.close()
    await acceptor.wait_closed()


def load_host_key(data: bytes) -> asyncssh.SSHKey:
    """Parse an OpenSSH or PEM private key."""
    return asyncssh.import_private_key(data)


def generate_host_key() -> tuple[bytes, str]:
    """A new ed25519 host key: (OpenSSH private key bytes, SHA256 fingerprint)."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    return key.export_private_key("openssh"), key.get_fingerprint("sha256")


def public_key_line(private_key: bytes) -> str:
    """The OpenSSH public key line of a private key."""
    key = asyncssh.import_private_key(private_key)
    return key.export_public_key("openssh").decode().strip()
