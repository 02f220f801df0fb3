"""``python -m kuberun_trio embedded-cluster``: run the embedded cluster standalone.

It serves until SIGINT or SIGTERM; either signal kills every pod (the kubelet's
shutdown), then the process exits 0. Signals are received with
``trio.open_signal_receiver`` and turned into a cancel scope -- never
``sys.exit`` from a handler (``shared/PITFALLS.md``).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

import trio

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "embedded-cluster",
        help="run the embedded Kubernetes API stand-in until SIGINT/SIGTERM",
        description=(
            "Run a local Kubernetes API stand-in (HTTP(S) + WebSocket exec) whose pods are "
            "process sandboxes on this host, and write a kubeconfig for it. kubectl and "
            "kubernetes clients can use it like a cluster. SIGINT/SIGTERM kill every pod, "
            "then exit 0."
        ),
    )
    p.add_argument("--kubeconfig-out", metavar="FILE", type=Path, required=True,
                   help="where to write the kubeconfig (mode 0600)")
    scheme = p.add_mutually_exclusive_group()
    scheme.add_argument("--https", dest="https", action="store_true", default=True,
                        help="serve HTTPS with a per-run CA (default)")
    scheme.add_argument("--http", dest="https", action="store_false", help="serve plain HTTP")
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: any free)")
    p.add_argument("--fail-image", metavar="PATTERN", action="append", default=[],
                   help="images matching this glob fail to pull (repeatable)")
    p.add_argument("--image-root", metavar="IMAGE=DIR", action="append", default=[],
                   help="give containers of IMAGE the root directory DIR (repeatable)")
    p.add_argument("--private-tmp", action="store_true",
                   help="give every pod an empty /tmp of its own (a tmpfs in its mount "
                        "namespace; the demo does this), instead of the host's")
    p.set_defaults(run=run)


def _image_roots(specs: list[str]) -> dict[str, str]:
    from ..errors import ConfigError

    roots = {}
    for spec in specs:
        image, sep, directory = spec.partition("=")
        if not sep or not image or not directory:
            raise ConfigError("--image-root", f"expected IMAGE=DIR, got {spec!r}")
        if not Path(directory).is_dir():
            raise ConfigError("--image-root", f"{directory} is not a directory")
        roots[image] = directory
    return roots


def run(args: argparse.Namespace) -> int:
    roots = _image_roots(args.image_root)
    trio.run(_main, args, roots)
    return 0


async def _main(args: argparse.Namespace, roots: dict[str, str]) -> None:
    from . import open_embedded_cluster

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_embedded_cluster(
            https=args.https, port=args.port, kubeconfig_path=args.kubeconfig_out,
            image_roots=roots, private_tmp=args.private_tmp,
        ) as cluster:
            for pattern in args.fail_image:
                cluster.faults.fail_image(pattern)
            print(f"embedded cluster serving at {cluster.url}", flush=True)
            print(f"kubeconfig: {cluster.kubeconfig_path}", flush=True)
            print(f"try: KUBECONFIG={cluster.kubeconfig_path} kubectl get pods", flush=True)
            async for signum in signals:
                log.info("received %s: deleting every pod and exiting",
                         signal.Signals(signum).name)
                break
    print("embedded cluster stopped", file=sys.stderr, flush=True)
