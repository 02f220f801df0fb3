"""Command line: argument parsing and dispatch to subcommands.

With no subcommand ``python -m kuberun_trio`` runs the gateway server
(:mod:`kuberun_trio.server.main`); with no arguments at all that is demo mode, on an
in-process embedded cluster. Each subcommand lives in its own module and registers an
``add_parser`` function; this module only builds the parser and maps results and errors
to exit codes:

* 0 -- success (also: the server shut down gracefully after SIGTERM/SIGINT);
* 1 -- a runtime error (:class:`KuberunError`), or a forced shutdown (second signal);
* 2 -- bad usage or bad configuration; 130 -- interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from . import __version__
from .errors import ConfigError, KuberunError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

Command = Callable[[argparse.Namespace], int]

EPILOG = """\
demo mode:
  python -m kuberun_trio        embedded cluster + gateway on 127.0.0.1:2222; prints the
                                ssh command that connects (keys kept in the state dir)

signals: SIGTERM/SIGINT shut down gracefully (exit 0): stop accepting, tell open sessions,
wait up to --grace, cut, delete every pod. A second signal cuts at once (exit 1).
SIGHUP re-reads authorized_keys and password files.

exit codes: 0 ok, 1 runtime error, 2 usage or configuration error
"""


def _subcommands() -> list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]]:
    from .cluster import cli as cluster_cli
    from .server import commands

    return [cluster_cli.add_parser, commands.add_parsers]


def build_parser() -> argparse.ArgumentParser:
    from .server import commands

    parser = argparse.ArgumentParser(
        prog="python -m kuberun_trio",
        description=(
            "SSH gateway that gives every SSH connection its own Kubernetes pod. "
            "Every session channel (shell, exec, sftp) runs as a pods/exec in that pod; "
            "the pod is deleted when the client disconnects."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"kuberun_trio {__version__}")
    commands.add_log_level(parser)
    commands.add_server_options(parser)
    parser.set_defaults(run=commands.run_server)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _subcommands():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is not None:  # subcommands log like the server (one timestamp format)
        from .server.logs import configure_logging

        configure_logging("text", args.log_level or "INFO")
    run: Command = args.run
    try:
        return run(args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KuberunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
