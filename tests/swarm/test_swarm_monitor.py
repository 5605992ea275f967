"""`swarm-monitor` over a live loopback swarm: its JSON state, its metrics (promtool, real Prometheus), the coverage
page rendered in headless Chromium, an uncovered block after a peer leaves, and no drift between the metrics the
dashboards and rules use and those the peers, the monitor and the client export."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import prometheus_client
import pytest
import torch

from swarm.process import SwarmProcess
from swarm.protocol import model_prefix_for
from swarm.testing import LocalSwarm
from tests.browser_tools import HeadlessChromium, require_chromium
from tests.model_factory import FIRST_ORDINARY_TOKEN, VOCAB_SIZE
from tests.prometheus_tools import (
    http_get,
    metric_names,
    monitoring_queries,
    promtool,
    query,
    rule_health_errors,
    running_prometheus,
    scrape,
    wait_for,
)

pytestmark = pytest.mark.slow

MONITOR_LINE = r"Monitor at (http://127\.0\.0\.1:\d+/)"
SPANS = [(0, 2), (0, 2), (2, 4)]  # blocks 0-1 twice, 2-3 once
TIMEOUT = 60.0


@dataclass
class Watched:
    swarm: LocalSwarm
    url: str  # the monitor's base URL, ending in /
    prefix: str
    peer_metrics_url: str

    def state(self) -> dict:
        return json.loads(http_get(self.url + "api/v1/state"))

    def model(self) -> dict:
        (model,) = self.state()["models"]
        return model


@pytest.fixture(scope="module")
def watched(make_swarm, connect, tiny_model_dir) -> Iterator[Watched]:
    """Three peers, a monitor crawling every second, and one generation by this process (for client metrics)."""
    model_dir = tiny_model_dir("llama", 4)
    local_swarm = make_swarm(model_dir, SPANS, peer_args=["--public-name", "watched", "--metrics-port", "0"])
    peer_metrics_url = local_swarm.metrics_url(local_swarm.peers[0])
    monitor = SwarmProcess(
        [sys.executable, "-m", "monitoring.swarm_monitor", "--initial-peers", *local_swarm.initial_peers,
         "--port", "0", "--period", "1", "--ping-timeout", "2"],
        name="swarm-monitor",
    )  # fmt: skip
    try:
        url = monitor.wait_for_line(MONITOR_LINE, TIMEOUT).group(1)
        watched = Watched(local_swarm, url, model_prefix_for(str(model_dir)), peer_metrics_url)
        prompt = torch.randint(FIRST_ORDINARY_TOKEN, VOCAB_SIZE, (1, 4), generator=torch.Generator().manual_seed(0))
        connect(model_dir, local_swarm).generate(prompt, max_new_tokens=3, do_sample=False, eos_token_id=None)
        wait_for(lambda: _online_peers(watched) == len(SPANS), TIMEOUT, "the monitor to show every peer online")
        yield watched
    finally:
        monitor.terminate()


def _online_peers(watched: Watched) -> int:
    try:
        models = watched.state()["models"]
    except OSError:  # 503 before the first crawl
        return 0
    return sum(peer["state"] == "online" for model in models for peer in model["peers"])


def test_state_shows_live_coverage(watched: Watched) -> None:
    state = watched.state()
    (bootstrap,) = state["bootstraps"]
    assert bootstrap["address"] == watched.swarm.initial_peers[0] and bootstrap["reachable"]
    model = watched.model()
    assert (model["prefix"], model["num_blocks"], model["healthy"], model["missing_blocks"]) == (
        watched.prefix, 4, True, []
    )  # fmt: skip
    assert [block["peers_by_state"]["online"] for block in model["blocks"]] == [2, 2, 1, 1]
    peers = model["peers"]
    assert sorted((peer["start"], peer["end"]) for peer in peers) == sorted(SPANS)
    assert all(peer["reachable"] and 0 < peer["ping_seconds"] < 2 for peer in peers)
    assert {peer["public_name"] for peer in peers} == {"watched"}
    first_span = sum(peer["throughput"] for peer in peers if peer["start"] == 0)
    assert model["blocks"][0]["throughput"] == pytest.approx(first_span)
    assert model["weakest_block"] == min(range(4), key=lambda i: model["blocks"][i]["throughput"])


def test_metrics_agree_with_the_state_and_pass_promtool(watched: Watched) -> None:
    text = http_get(watched.url + "metrics")
    result = promtool("check", "metrics", stdin=text)
    assert result.returncode == 0, result.stdout + result.stderr
    samples = scrape(watched.url + "metrics")
    model = f'model="{watched.prefix}"'
    for block, online in [("000", 2), ("001", 2), ("002", 1), ("003", 1)]:
        assert samples[f'blockswarm_swarm_block_peers{{block="{block}",{model},state="online"}}'] == online
        assert samples[f'blockswarm_swarm_block_peers{{block="{block}",{model},state="offline"}}'] == 0
    assert samples[f"blockswarm_swarm_model_blocks{{{model}}}"] == 4
    assert samples[f"blockswarm_swarm_blocks_uncovered{{{model}}}"] == 0
    assert samples[f'blockswarm_swarm_model_peers{{{model},state="online"}}'] == len(SPANS)
    assert samples["blockswarm_swarm_models_served{}"] == 1
    assert samples['blockswarm_monitor_bootstrap_reachable{bootstrap="0"}'] == 1
    assert samples['blockswarm_monitor_crawls_total{status="ok"}'] >= 1
    assert samples["blockswarm_monitor_last_crawl_success_timestamp_seconds{}"] > 1.6e9
    assert samples["blockswarm_monitor_peer_ping_seconds_count{}"] >= len(SPANS)
    assert all("peer_id" not in name for name in samples)  # bounded labels: no peer ids


def test_page_renders_the_coverage_in_chromium(watched: Watched, tmp_path: Path) -> None:
    require_chromium()
    with HeadlessChromium(tmp_path / "chromium") as browser:
        browser.load(watched.url)
        browser.wait_until("document.body.dataset.loaded === 'true'", TIMEOUT, "the page to show the first crawl")
        section = f'section.model[data-prefix="{watched.prefix}"]'
        page = browser.evaluate(
            f"""(() => {{
              const section = document.querySelector('{section}');
              return {{
                healthy: section.dataset.healthy,
                online: [...section.querySelectorAll('.coverage .block')].map(b => Number(b.dataset.online)),
                peers: section.querySelectorAll('tr.peer').length,
                badge: section.querySelector('.badge').textContent,
                text: document.body.innerText,
              }};
            }})()"""
        )
        screenshot = browser.screenshot(tmp_path / "monitor.png")
    print(f"monitor page screenshot: {screenshot}")
    assert page["healthy"] == "true" and page["badge"] == "healthy"
    assert page["online"] == [2, 2, 1, 1]
    assert page["peers"] == len(SPANS)
    assert "4/4 blocks covered" in page["text"] and "watched" in page["text"]
    assert screenshot.stat().st_size > 0


def test_prometheus_scrapes_the_monitor_and_a_peer(watched: Watched, tmp_path: Path) -> None:
    jobs = {
        "blockswarm-monitor": [watched.url.removeprefix("http://").rstrip("/")],
        "blockswarm-peer": [watched.peer_metrics_url.removeprefix("http://").removesuffix("/metrics")],
    }
    with running_prometheus(tmp_path, jobs) as prometheus:
        up = wait_for(
            lambda: len(result := [r for r in query(prometheus, "up == 1")]) == 2 and result,
            TIMEOUT,
            "Prometheus to report the monitor and the peer up",
        )
        assert {r["metric"]["job"] for r in up} == set(jobs)
        (blocks,) = wait_for(
            lambda: query(prometheus, f'blockswarm_swarm_model_blocks{{model="{watched.prefix}"}}'),
            TIMEOUT,
            "the monitor's model metric in Prometheus",
        )
        assert float(blocks["value"][1]) == 4
        assert not rule_health_errors(prometheus)


def test_dashboards_and_rules_use_only_exported_metrics(watched: Watched) -> None:
    exported = {name.split("{")[0] for name in scrape(watched.url + "metrics")}
    exported |= {name.split("{")[0] for name in scrape(watched.peer_metrics_url)}
    client = prometheus_client.generate_latest(prometheus_client.REGISTRY).decode()
    exported |= {family.name for family in prometheus_client.parser.text_string_to_metric_families(client)}
    exported |= {
        sample.name
        for family in prometheus_client.parser.text_string_to_metric_families(client)
        for sample in family.samples
    }
    assert prometheus_client.REGISTRY.get_sample_value("blockswarm_client_time_to_first_token_seconds_count") >= 1
    assert prometheus_client.REGISTRY.get_sample_value("blockswarm_client_inter_token_seconds_count") >= 2
    queries = monitoring_queries()
    assert {"peer.json", "swarm.json", "blockswarm.yml", "blockswarm-swarm.yml"} <= set(queries)
    for file_name, expressions in queries.items():
        missing = set().union(*map(metric_names, expressions)) - exported
        assert not missing, f"{file_name} uses metrics nothing exports: {sorted(missing)}"


def test_a_block_whose_only_peer_leaves_shows_as_uncovered(watched: Watched) -> None:
    (last,) = [peer for peer in watched.swarm.peers if "swarm-peer[2:4]" in peer.name]
    last.terminate()
    model = wait_for(
        lambda: not (m := watched.model())["healthy"] and m, TIMEOUT, "the monitor to show blocks 2:4 uncovered"
    )
    assert model["missing_blocks"] == [2, 3]
    assert [block["peers_by_state"]["online"] for block in model["blocks"]] == [2, 2, 0, 0]
    samples = scrape(watched.url + "metrics")
    assert samples[f'blockswarm_swarm_blocks_uncovered{{model="{watched.prefix}"}}'] == 2
