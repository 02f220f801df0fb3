"""kuberun_trio: an SSH gateway that gives every SSH connection its own Kubernetes pod.

The package is trio-flavoured throughout, except :mod:`kuberun_trio.aio`, the
asyncio boundary. See ``docs/architecture.md`` for the map.
"""

from __future__ import annotations

from .errors import (
    AuthError as AuthError,
)
from .errors import (
    ClusterError as ClusterError,
)
from .errors import (
    ConfigError as ConfigError,
)
from .errors import (
    ExecError as ExecError,
)
from .errors import (
    KubernetesError as KubernetesError,
)
from .errors import (
    KuberunError as KuberunError,
)
from .errors import (
    NotFoundError as NotFoundError,
)
from .errors import (
    PodStartError as PodStartError,
)

__version__ = "0.1.0"
