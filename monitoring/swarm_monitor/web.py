"""The monitor's HTTP server: `/metrics`, `/api/v1/state` (JSON) and `/` (the coverage page), from the cache.

Every request reads the last snapshot only, so a slow DHT never slows a scrape or a page load. Standard-library
server on a daemon thread: three read-only routes need no framework.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from monitoring.swarm_monitor.state import SwarmSnapshot

logger = logging.getLogger(__name__)

PAGE = resources.files(__package__).joinpath("page.html").read_bytes()


class MonitorServer:
    """Serves on `host:port` (port 0: a free one) until `close()`."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry, snapshot: Callable[[], SwarmSnapshot | None]):
        routes: dict[str, Callable[[], tuple[HTTPStatus, str, bytes]]] = {
            "/": lambda: (HTTPStatus.OK, "text/html; charset=utf-8", PAGE),
            "/metrics": lambda: (HTTPStatus.OK, CONTENT_TYPE_LATEST, generate_latest(registry)),
            "/api/v1/state": lambda: _state(snapshot()),
        }

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                route = routes.get(self.path.split("?", 1)[0])
                status, content_type, body = route() if route else _not_found(self.path)
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                logger.debug("%s " + format, self.address_string(), *args)

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="monitor-http", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def _state(snapshot: SwarmSnapshot | None) -> tuple[HTTPStatus, str, bytes]:
    if snapshot is None:
        body = {"error": "no crawl has finished yet; retry in a few seconds"}
        return HTTPStatus.SERVICE_UNAVAILABLE, "application/json", json.dumps(body).encode()
    return HTTPStatus.OK, "application/json", json.dumps(snapshot.to_json()).encode()


def _not_found(path: str) -> tuple[HTTPStatus, str, bytes]:
    body = {"error": f"no such page: {path}; try /, /metrics or /api/v1/state"}
    return HTTPStatus.NOT_FOUND, "application/json", json.dumps(body).encode()
