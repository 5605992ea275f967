"""Running the gateway: uvicorn on the swarm client's event loop, inside the `swarm serve` process.

The client's coroutines (sessions, DHT reads) already run on one loop thread (swarm/client/_sync.py); uvicorn
runs there too, so the process keeps a single event loop, and nothing blocks it: generation runs in worker
threads (generation.py). The main thread only waits, so Ctrl-C and SIGTERM (which the CLI turns into
KeyboardInterrupt) reach it; it then lets open requests finish for up to GRACEFUL_SHUTDOWN_SECONDS.

The socket is bound and listening before the ready line is printed, so a client that reads the line can
connect at once; `--port 0` picks a free port, and the line says which.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import socket
import sys
from collections.abc import Iterator
from typing import TextIO

import uvicorn
from fastapi import FastAPI

from swarm.client._sync import client_loop
from swarm.errors import ConfigError

GRACEFUL_SHUTDOWN_SECONDS = 10.0
BACKLOG = 2048  # uvicorn's default


class _Server(uvicorn.Server):
    """uvicorn without signal handlers of its own: the process's owner (the CLI) handles signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def serve(app: FastAPI, *, host: str, port: int, model_name: str, out: TextIO = sys.stdout) -> None:
    """Serve `app` on host:port until KeyboardInterrupt (which is re-raised after a graceful stop)."""
    sock = _listen(host, port)
    url = f"http://{f'[{host}]' if ':' in host else host}:{sock.getsockname()[1]}"
    config = uvicorn.Config(app, log_config=None, lifespan="off", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS)
    server = _Server(config)
    loop = client_loop()
    serving = asyncio.run_coroutine_threadsafe(server.serve(sockets=[sock]), loop)
    print(f"Gateway for {model_name} at {url}  (OpenAI base URL {url}/v1, chat page {url}/)", file=out, flush=True)
    try:
        serving.result()
    except KeyboardInterrupt:
        loop.call_soon_threadsafe(setattr, server, "should_exit", True)
        try:
            serving.result(timeout=GRACEFUL_SHUTDOWN_SECONDS + 5.0)
        except concurrent.futures.TimeoutError:
            loop.call_soon_threadsafe(setattr, server, "force_exit", True)
        raise
    finally:
        sock.close()


def _listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --host or --port") from e
    sock.listen(BACKLOG)
    return sock
