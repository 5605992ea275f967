"""`swarm serve` as a command: its flags, a taken port, and SIGTERM stopping it with nothing left behind."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import pytest

from swarm.cli import build_parser
from swarm.errors import ConfigError
from swarm.gateway.server import _listen
from swarm.process import descendants
from swarm.testing import LocalSwarm
from tests.gateway.conftest import MODEL_NAME, running_gateway

GONE_TIMEOUT = 15.0

PEER = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWR1755HJTtR6ZYZNVngNrv9adN95NQQNvDvGo2VtJBEpf"


def test_serve_defaults_to_loopback_port_8000_without_key() -> None:
    args = build_parser().parse_args(["serve", "m", "--initial-peers", PEER])

    assert (args.host, args.port, args.api_key, args.served_model_name) == ("127.0.0.1", 8000, None, None)
    assert args.connect_timeout == 10.0


def test_serve_takes_petals_style_spellings() -> None:
    args = build_parser().parse_args(
        ["serve", "m", "--initial_peers", PEER, "--api_key", "k", "--served_model_name", "n", "--port", "0"]
    )

    assert (args.api_key, args.served_model_name, args.port) == ("k", "n", 0)


@pytest.mark.parametrize("port", ["-1", "65536", "http"])
def test_serve_refuses_a_port_that_is_not_one(port: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", "m", "--initial-peers", PEER, "--port", port])
    assert exit_info.value.code == 2


def test_a_taken_port_is_a_config_error_naming_it() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
            _listen("127.0.0.1", port)


@pytest.mark.slow
def test_sigterm_stops_the_gateway_and_every_process_it_started(demo_model: Path, gateway_swarm: LocalSwarm) -> None:
    with running_gateway(demo_model, gateway_swarm.initial_peers) as gateway:
        assert [model.id for model in gateway.client.models.list().data] == [MODEL_NAME]
        started = descendants(gateway.process.pid)  # the client's DHT process and its p2pd

        gateway.process.send_signal(signal.SIGTERM)
        returncode = gateway.process.wait(timeout=60)
        deadline = time.monotonic() + GONE_TIMEOUT
        while (left := [info for info in started if info.is_running()]) and time.monotonic() < deadline:
            time.sleep(0.05)

    assert returncode == 143, gateway.process.output()
    assert "swarm serve: terminated" in gateway.process.output("stderr")
    assert any(info.name == "p2pd" for info in started)
    assert left == []
