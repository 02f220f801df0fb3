"""Command line: argument parsing and dispatch to subcommands.

Each subcommand lives in its own module and registers an ``add_parser``
function in :data:`SUBCOMMANDS`; this module only builds the parser, sets up
logging and maps results and errors to exit codes:

* 0 -- success; 1 -- a runtime error (:class:`KuberunError`);
* 2 -- bad usage or bad configuration; 130 -- interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from . import __version__
from .errors import ConfigError, KuberunError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

Command = Callable[[argparse.Namespace], int]


def _subcommands() -> list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]]:
    from .cluster import cli as cluster_cli

    return [cluster_cli.add_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m kuberun_trio",
        description=(
            "SSH gateway that gives every SSH connection its own Kubernetes pod. "
            "Every session channel (shell, exec, sftp) runs as a pods/exec in that pod; "
            "the pod is deleted when the client disconnects."
        ),
    )
    parser.add_argument("--version", action="version", version=f"kuberun_trio {__version__}")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log threshold (default: INFO)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _subcommands():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    run: Command | None = getattr(args, "run", None)
    if run is None:
        parser.print_help()
        return EXIT_USAGE
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
