"""The ``metrics`` and ``health`` configuration sections: defaults, demo defaults, errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from kuberun_trio.errors import ConfigError, ConfigErrors
from kuberun_trio.observe import HealthEndpoint, MetricsEndpoint
from kuberun_trio.server.config import parse_server_config
from kuberun_trio.server.main import endpoint_options
from kuberun_trio.server.settings import load_settings


def problems(data: dict[str, object]) -> list[str]:
    with pytest.raises((ConfigError, ConfigErrors)) as caught:
        parse_server_config(data)
    exc = caught.value
    errors = exc.errors if isinstance(exc, ConfigErrors) else [exc]
    return [str(e) for e in errors]


def test_defaults_are_off_and_containerssh_addresses() -> None:
    config = parse_server_config({})
    assert (config.metrics.enable, config.metrics.listen, config.metrics.path) == (
        False, "0.0.0.0:9100", "/metrics")
    assert (config.health.enable, config.health.listen) == (False, "0.0.0.0:7000")


def test_every_bad_value_is_named_by_its_key() -> None:
    found = problems({"metrics": {"enable": "yes"}, "health": {"port": 7000}})
    assert sorted(p.split(":")[0] for p in found) == ["health.port", "metrics.enable"], found
    found = problems({"ssh": {"listen": "127.0.0.1:2222"}, "health": {"listen": ":2222"},
                      "metrics": {"listen": "127.0.0.1:2222"}})
    assert {"health.listen: port 2222 is the SSH listener's",
            "metrics.listen: port 2222 is the SSH listener's"} <= set(found), found
    found = problems({"metrics": {"listen": "127.0.0.1:9100"}, "health": {"listen": ":9100"}})
    assert [p.split(":")[0] for p in found] == ["health.listen"], found
    shared = parse_server_config({"metrics": {"listen": "127.0.0.1:9100"},
                                  "health": {"listen": "127.0.0.1:9100"}})
    assert shared.health.address == shared.metrics.address  # one server answers both
    found = problems({"metrics": {"listen": "9100", "path": "/healthz"}})
    assert sorted(p.split(":")[0] for p in found) == ["metrics.listen", "metrics.path"], found
    found = problems({"metrics": {"path": "/has space"}})
    assert [p.split(":")[0] for p in found] == ["metrics.path"]
    assert problems({"metrics": 5})[0].startswith("metrics")


def _args(**kw: object) -> argparse.Namespace:
    return argparse.Namespace(**kw)


def test_demo_turns_metrics_on_locally(tmp_path: Path) -> None:
    demo = load_settings(_args(state_dir=str(tmp_path)), environ={})
    assert demo.demo
    assert (demo.config.metrics.enable, demo.config.metrics.listen) == (True, "127.0.0.1:9100")
    assert endpoint_options(demo) == {
        "metrics_endpoint": MetricsEndpoint("127.0.0.1", 9100, "/metrics", next_free=100)}
    path = tmp_path / "c.yaml"
    path.write_text("metrics: {enable: false}\nhealth: {enable: true, listen: '127.0.0.1:7001'}\n")
    served = load_settings(_args(state_dir=str(tmp_path), config=str(path)), environ={})
    assert not served.demo and not served.config.metrics.enable
    assert endpoint_options(served) == {"health_endpoint": HealthEndpoint("127.0.0.1", 7001)}
