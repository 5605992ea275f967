"""Helpers for tests that need Prometheus' own tools: `promtool` and `prometheus` from Debian's `prometheus` package.

The package is installed on first use when missing and the tests run as root; elsewhere those tests skip and say why.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.debian_packages import require_debian_package

INSTALL_TIMEOUT_SECONDS = 240
_T = TypeVar("_T")


def require_prometheus_tools() -> tuple[str, str]:
    """Paths of `promtool` and `prometheus`, installing Debian's `prometheus` package if needed and possible."""

    def find() -> str | None:
        return shutil.which("prometheus") if shutil.which("promtool") else None

    prometheus = require_debian_package("prometheus", find, INSTALL_TIMEOUT_SECONDS)
    return shutil.which("promtool") or "promtool", prometheus


def promtool(*args: str | os.PathLike[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    path, _ = require_prometheus_tools()
    return subprocess.run([path, *map(os.fspath, args)], input=stdin, capture_output=True, text=True, timeout=60)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def scrape(url: str) -> dict[str, float]:
    """{'name{label="value",...}': value} for every sample of a `/metrics` page, labels sorted by name."""
    samples = {}
    for family in text_string_to_metric_families(http_get(url)):
        for sample in family.samples:
            labels = ",".join(f'{key}="{value}"' for key, value in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def query(prometheus_url: str, promql: str) -> list[dict[str, Any]]:
    """The result vector of an instant query through Prometheus' HTTP API."""
    reply = json.loads(http_get(f"{prometheus_url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"))
    assert reply["status"] == "success", reply
    return reply["data"]["result"]


def wait_for(condition: Callable[[], _T | None], timeout: float, what: str, interval: float = 0.25) -> _T:
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


MONITORING_DIR = Path(__file__).resolve().parents[1] / "monitoring"


@contextlib.contextmanager
def running_prometheus(work: Path, jobs: dict[str, list[str]], timeout: float = 60.0) -> Iterator[str]:
    """A real Prometheus on 127.0.0.1 scraping `jobs` ({job name: ["host:port", ...]}) every second, with the
    shipped alert rules loaded; yields its base URL and stops it by PID."""
    from swarm.process import SwarmProcess

    _, binary = require_prometheus_tools()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(path) for path in sorted((MONITORING_DIR / "prometheus" / "rules").glob("*.yml"))],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": targets}]} for job, targets in jobs.items()
        ],
    }
    (work / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    port = free_port()
    process = SwarmProcess(
        [
            binary,
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        name="prometheus",
    )
    try:
        process.wait_for_line("Server is ready to receive web requests", timeout)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()


def rule_health_errors(prometheus_url: str) -> list[str]:
    """Names of loaded rules Prometheus failed to evaluate; asserts some rules are loaded."""
    groups = json.loads(http_get(f"{prometheus_url}/api/v1/rules"))["data"]["groups"]
    assert groups, "Prometheus loaded no rule groups"
    return [rule["name"] for group in groups for rule in group["rules"] if rule["health"] == "err"]


def rule_expressions(path: Path) -> list[str]:
    """The PromQL of every rule in a Prometheus rule file."""
    return [rule["expr"] for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def dashboard_queries(path: Path) -> list[str]:
    """The PromQL of every panel target and template variable of a Grafana dashboard."""
    dashboard = json.loads(path.read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            queries.append(variable["definition"])
    return queries


def metric_names(promql: str) -> set[str]:
    """blockswarm metric names a PromQL expression reads (`label_values(m, l)` included)."""
    return set(re.findall(r"\bblockswarm_[a-z0-9_]*[a-z0-9]", promql))


def monitoring_queries() -> dict[str, list[str]]:
    """{file name: its PromQL} for every shipped dashboard and rule file."""
    dashboards = sorted((MONITORING_DIR / "grafana" / "dashboards").glob("*.json"))
    rules = sorted((MONITORING_DIR / "prometheus" / "rules").glob("*.yml"))
    return {
        **{path.name: dashboard_queries(path) for path in dashboards},
        **{path.name: rule_expressions(path) for path in rules},
    }
