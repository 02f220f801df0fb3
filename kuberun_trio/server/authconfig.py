"""The ``auth`` section: who may connect, the webhook, login throttling, password hashing.

Theory of operation
-------------------
Deny by default: with nothing configured nobody can log in. ``authorizedKeys`` and
``passwordFile`` are checked first, then the ContainerSSH ``webhook`` (after the local files
said no); see :mod:`.auth`. ``maxTries`` and ``throttle`` become the gateway's
:class:`~kuberun_trio.gateway.throttle.LoginPolicy` (:meth:`AuthConfig.login_policy`),
``passwordHashing`` sizes the fair queue of :mod:`.hashing`.

The classes are structured by :func:`kuberun_trio.server.config.parse_server_config`;
:func:`check_auth` then adds the cross-field problems (webhook URL and CA, limits, the
``%u``/``%h`` tokens of per-user paths), each under its dotted key path. Whether the named
files can be read is the third pass, :func:`kuberun_trio.server.config.check_files`.
"""

from __future__ import annotations

import re

import attrs

from ..configtools import ConfigProblems, duration, key_path
from ..gateway.throttle import LoginPolicy


@attrs.frozen
class WebhookConfig:
    """A ContainerSSH-compatible authentication webhook (``auth.webhook``)."""

    url: str
    """Base URL; the gateway POSTs to ``{url}/password`` and ``{url}/pubkey``."""
    timeout: float = duration(2.0)
    """Time allowed for one webhook request (YAML: ``"2s"`` or a number of seconds)."""
    cacert: str | None = None
    """PEM file with the CA certificate(s) of an ``https`` webhook; default: system CAs."""


@attrs.frozen
class ThrottleConfig:
    """Login throttling (``auth.throttle``): see :mod:`kuberun_trio.gateway.throttle`."""

    free_failures: int = 3
    """Attempts (per address and per username) since the last success that cost no wait."""
    delay: float = duration(1.0)
    """The wait after the first attempt beyond ``freeFailures``; it doubles with each."""
    max_delay: float = duration(10.0)
    """The longest wait; an attempt whose turn is further away is refused at once."""
    forget_after: float = duration(900.0)
    """Time after an address's or username's last attempt when its count restarts."""


@attrs.frozen
class PasswordHashingConfig:
    """Password verification (``auth.passwordHashing``): see :mod:`.hashing`."""

    threads: int = 2
    """Worker threads verifying hashes at once (argon2's default uses 64 MiB each)."""
    queue: int = 16
    """Checks that may wait for a thread; beyond that a password login is refused at once."""


@attrs.frozen
class AuthConfig:
    """Who may connect (``auth``). Deny by default: with nothing configured, nobody can."""

    authorized_keys: tuple[str, ...] = ()
    """OpenSSH ``authorized_keys`` files; a key in any of them lets any username in. A
    path with ``%u`` (username), ``%h`` (``homeDirectory``) or ``%%`` is a per-user file
    (OpenSSH ``AuthorizedKeysFile`` tokens): its keys let only that username in."""
    password_file: str | None = None
    """File of ``user:hash`` lines (argon2 or bcrypt hashes)."""
    webhook: WebhookConfig | None = None
    """Ask a webhook about passwords and public keys (after the local files said no)."""
    max_tries: int = 6
    """Failed attempts per connection (offered keys count) before it is disconnected."""
    throttle: ThrottleConfig = attrs.Factory(ThrottleConfig)
    password_hashing: PasswordHashingConfig = attrs.Factory(PasswordHashingConfig)
    home_directory: str = "/home/%u"
    """What ``%h`` stands for: gateway users are not host users, so not the passwd entry."""

    def login_policy(self) -> LoginPolicy:
        """The gateway's :class:`~kuberun_trio.gateway.throttle.LoginPolicy` for this section."""
        t = self.throttle
        return LoginPolicy(max_tries=self.max_tries, free_failures=t.free_failures,
                           delay=t.delay, max_delay=t.max_delay, forget_after=t.forget_after)


def check_auth(auth: AuthConfig, problems: ConfigProblems) -> None:
    """Add the problems of a structured ``auth`` section."""
    if auth.webhook is not None:
        _check_webhook(auth.webhook, problems)
    _check_limits(auth, problems)
    _check_templates(auth, problems)


def _check_webhook(webhook: WebhookConfig, problems: ConfigProblems) -> None:
    if not re.match(r"https?://[^/]", webhook.url):
        problems.add("auth.webhook.url",
                     f"expected an http:// or https:// URL, got {webhook.url!r}")
    if webhook.cacert is not None and not webhook.url.startswith("https://"):
        problems.add("auth.webhook.cacert", "only valid with an https:// url")


def _check_limits(auth: AuthConfig, problems: ConfigProblems) -> None:
    t, h = auth.throttle, auth.password_hashing
    for where, value, least in [("auth.maxTries", auth.max_tries, 1),
                                ("auth.throttle.freeFailures", t.free_failures, 0),
                                ("auth.passwordHashing.threads", h.threads, 1),
                                ("auth.passwordHashing.queue", h.queue, 0)]:
        if value < least:
            problems.add(where, f"must be at least {least}, got {value}")
    if t.delay < 0:
        problems.add("auth.throttle.delay", f"must not be negative, got {t.delay:g}s")
    if t.max_delay < t.delay:
        problems.add("auth.throttle.maxDelay",
                     f"must be at least auth.throttle.delay ({t.delay:g}s), got {t.max_delay:g}s")


def _check_templates(auth: AuthConfig, problems: ConfigProblems) -> None:
    from .authkeys import template_problem

    for i, path in enumerate(auth.authorized_keys):
        if (problem := template_problem(path)) is not None:
            problems.add(key_path("auth.authorizedKeys", i), problem)
    problem = template_problem(auth.home_directory)
    if problem is None and "%h" in auth.home_directory:
        problem = "%h cannot be used in its own definition"
    if problem is not None:
        problems.add("auth.homeDirectory", problem)

