"""The server's command-line surface: its options, ``check-config`` and ``gc``.

Theory of operation
-------------------
The default command (no subcommand) is the server; its options live on the top-level
parser (:func:`add_server_options`). ``gc`` reads the same configuration, so it accepts the
cluster-selecting options too -- registered on the subparser with ``default=SUPPRESS`` so
that ``python -m kuberun_trio --config F gc`` and ``python -m kuberun_trio gc --config F``
mean the same thing (a subparser's defaults would otherwise overwrite the top level's).

``check-config FILE`` runs every check the server runs at start (structure, cross-field
rules, the files it names, host keys, loading the kubeconfig or in-cluster account) and
prints every problem at once, each with its key path.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from ..configtools import read_yaml_mapping
from ..errors import ConfigError, ConfigErrors
from .config import ServerConfig, parse_server_config
from .opsconfig import LOG_FORMATS, LOG_LEVELS
from .settings import CLUSTER_CHOICES
from .sshconfig import parse_listen

if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]


def _listen(text: str) -> str:
    try:
        parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _level(text: str) -> str:
    if text.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(LOG_LEVELS)}")
    return text.upper()


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def add_cluster_options(parser: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    """Options that select the configuration, the cluster and the instance."""
    d: dict[str, Any] = {"default": argparse.SUPPRESS} if suppress else {}
    parser.add_argument("--config", metavar="FILE", **d,
                        help="YAML configuration (sections ssh, auth, kubernetes, log); "
                             "flags override it")
    parser.add_argument("--cluster", choices=CLUSTER_CHOICES, **d,
                        help="where pods go: an in-process embedded cluster (the default "
                             "without --config/--kubeconfig), a kubeconfig, or the service "
                             "account of the pod the gateway runs in")
    parser.add_argument("--kubeconfig", metavar="FILE", **d,
                        help="kubeconfig to use (default: $KUBECONFIG, ~/.kube/config)")
    parser.add_argument("--context", metavar="NAME", **d,
                        help="kubeconfig context (default: its current-context)")
    parser.add_argument("--namespace", metavar="NS", **d,
                        help="namespace of the pods (kubernetes.pod.metadata.namespace)")
    parser.add_argument("--instance", metavar="NAME", **d,
                        help="this gateway's name, in every pod's labels and its Lease; orphan "
                             "clean-up and gc act on this instance's pods (default: POD_NAME "
                             "in a cluster, else the host name)")


def add_server_options(parser: argparse.ArgumentParser) -> None:
    """The default command's options, on the top-level parser."""
    server = parser.add_argument_group(
        "server options (no subcommand: run the gateway; with no options at all: demo mode)")
    add_cluster_options(server)  # type: ignore[arg-type]  # groups take the same calls
    server.add_argument("--listen", metavar="HOST:PORT", type=_listen,
                        help="SSH listen address (default 127.0.0.1:2222; ssh.listen)")
    server.add_argument("--host-key", metavar="FILE", action="append",
                        help="SSH host private key, OpenSSH or PEM (repeatable; default: an "
                             "ed25519 key generated once into the state dir)")
    server.add_argument("--authorized-keys", metavar="FILE", action="append",
                        help="OpenSSH authorized_keys file (repeatable; auth.authorizedKeys)")
    server.add_argument("--image", metavar="IMAGE",
                        help="image of the console container (kubernetes.pod.spec)")
    server.add_argument("--state-dir", metavar="DIR",
                        help="where generated keys live (default: $XDG_STATE_HOME/kuberun-trio "
                             "or ~/.local/state/kuberun-trio)")
    server.add_argument("--log-format", choices=LOG_FORMATS,
                        help="text or json lines on stderr (default text; log.format)")
    server.add_argument("--grace", metavar="SECONDS", type=_positive,
                        help="on SIGTERM/SIGINT, how long open sessions may run on before "
                             "they are cut (default 10)")


def run_server(args: argparse.Namespace) -> int:
    """The default command (imported lazily: ``--help`` and ``check-config`` stay fast)."""
    from .main import run

    return run(args)


def add_log_level(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", metavar="LEVEL", type=_level,
                        help=f"log threshold: {', '.join(LOG_LEVELS)} "
                             "(default INFO; log.level)")


def add_parsers(sub: SubParsers) -> None:
    """Register ``check-config`` and ``gc``."""
    check = sub.add_parser(
        "check-config", help="validate a configuration file; exit 0 if fine, 2 if not",
        description="Check a configuration file as the server would at start -- structure, "
                    "values, the files it names, host keys, the kubeconfig (or in-cluster "
                    "service account) -- and print every problem with "
                    "its key path. Exit 0 if the file is fine, 2 otherwise.")
    check.add_argument("file", metavar="FILE", help="the YAML configuration")
    check.set_defaults(run=run_check_config)

    gc = sub.add_parser(
        "gc", help="delete the pods of this instance (orphans of a gateway that died)",
        description="Delete every pod labelled with this gateway instance "
                    "(app.kubernetes.io/managed-by=kuberun-trio, kuberun.trio/instance=NAME) "
                    "in the configured namespace. It refuses while a live gateway holds the "
                    "instance's Lease (its pods look the same), unless --force. The server "
                    "does this itself at start.")
    gc.add_argument("--dry-run", action="store_true", help="only list the pods")
    gc.add_argument("--force", action="store_true",
                    help="delete even while a live gateway holds the instance's Lease")
    add_cluster_options(gc, suppress=True)
    gc.set_defaults(run=run_gc)


def run_check_config(args: argparse.Namespace) -> int:
    try:
        config = parse_server_config(read_yaml_mapping(args.file), files=True, cluster=True)
    except ConfigError as exc:
        errors = exc.errors if isinstance(exc, ConfigErrors) else (exc,)
        print(f"{args.file}: {len(errors)} problem{'s' if len(errors) > 1 else ''}",
              file=sys.stderr)
        for error in errors:
            print(f"  {error}", file=sys.stderr)
        return 2
    conn = config.kubernetes.connection
    print(f"{args.file}: OK (listen {config.ssh.listen}, instance {config.instance}, "
          f"cluster via {conn.source})")
    return 0


async def refuse_if_live(config: ServerConfig) -> None:
    """Raise :class:`KuberunError` if a live gateway holds ``config.instance``'s Lease."""
    import datetime

    from ..aio.kube import open_kube_client
    from ..errors import KubernetesError, KuberunError, NotFoundError
    from ..gateway.lease import lease_name, view
    from .main import gateway_options

    lease = gateway_options(config, config.kubernetes)["lease"]
    if lease is None:
        return
    name = lease_name(config.instance)
    async with open_kube_client(config.kubernetes) as kube:
        try:
            seen = view(await kube.get_lease(lease.namespace, name))
        except NotFoundError:
            return
        except KubernetesError as exc:
            print(f"warning: cannot read Lease {lease.namespace}/{name}: {exc}", file=sys.stderr)
            return
    now = datetime.datetime.now(datetime.UTC)
    if not seen.expired(now):
        raise KuberunError(
            f"instance {config.instance!r} is live: Lease {lease.namespace}/{name} "
            f"({seen.describe(now)}); its pods are not orphans (--force deletes them anyway)")


def run_gc(args: argparse.Namespace) -> int:
    import trio

    from ..aio.bridge import open_aio_loop
    from .logs import configure_logging
    from .main import run_trio_main, sweep_orphans
    from .settings import load_settings

    if getattr(args, "cluster", None) == "embedded":
        raise ConfigError("--cluster", "gc needs a real cluster: kubeconfig or in-cluster")
    if not any(getattr(args, k, None) for k in ("config", "cluster", "kubeconfig", "context")):
        args.cluster = "kubeconfig"  # not the demo: the default kubeconfig
    settings = load_settings(args)
    configure_logging(settings.config.log.format, args.log_level or settings.config.log.level)
    from .kubecheck import connection_problems

    if problems := connection_problems(settings.config.kubernetes.connection):
        raise problems[0] if len(problems) == 1 else ConfigErrors(problems)
    namespace = str(settings.config.kubernetes.pod.metadata.get("namespace") or "default")

    async def main() -> int:
        async with open_aio_loop():
            if not args.force:
                await refuse_if_live(settings.config)
            names = await sweep_orphans(settings.config.kubernetes, settings.config.instance,
                                        dry_run=args.dry_run)
        verb = "would delete" if args.dry_run else "deleted"
        for name in names:
            print(f"{verb} pod {namespace}/{name}")
        print(f"{verb} {len(names)} pod{'' if len(names) == 1 else 's'} of instance "
              f"{settings.config.instance} in namespace {namespace}")
        await trio.lowlevel.checkpoint()
        return 0

    return run_trio_main(main)
