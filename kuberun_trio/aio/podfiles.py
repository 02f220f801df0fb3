"""Write files into a pod through ``pods/exec`` (asyncio side).

Theory of operation
-------------------
The connection's settings may carry files (:attr:`~kuberun_trio.core.connsettings.
ConnectionSettings.files`). Once the pod is Ready and before any session starts, the
connection task calls :func:`write_files` once through the bridge. Each file is one exec
of :func:`~kuberun_trio.core.connsettings.write_file_argv` in the console container
-- a POSIX ``sh`` that takes the path as an argument (never parsed by a shell) and
exactly ``size`` bytes from stdin, so no content ever sits in a URL or an argv. The
files are written one after another; the first that fails raises
:class:`~kuberun_trio.errors.ExecError` with the path and what the pod said.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..core.connsettings import write_file_argv
from ..errors import ExecError
from .execstream import open_exec
from .sshsession import ExecTarget, _Collector

CHUNK = 64 * 1024


async def write_files(target: ExecTarget, files: Mapping[str, bytes]) -> None:
    """Write every file; asyncio-flavoured. Raises ExecError naming the first failure."""
    for path, content in files.items():
        stream = await open_exec(target.ws_client, target.namespace, target.pod,
                                 target.container, write_file_argv(path, len(content)),
                                 tty=False, stdin=True, throttle=target.throttle,

                                 open_within=target.open_timeout)
        for start in range(0, len(content), CHUNK):
            stream.send_stdin(content[start:start + CHUNK])
        stream.close_stdin()
        sink = _Collector(limit=4096)
        result = await stream.run(sink)
        if result.exit_code != 0:
            said = sink.stderr.decode(errors="replace").strip() or result.message
            raise ExecError(f"cannot write {path} into the pod (exit status "
                            f"{result.exit_code}): {said[:300]}")
