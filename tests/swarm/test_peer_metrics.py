"""A live peer's `/metrics`: real values after a generation, `promtool check metrics`, and a real Prometheus
scraping it with the shipped rules loaded. (The drift test, over every exporter, is in test_swarm_monitor.py.)"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from tests.model_factory import FIRST_ORDINARY_TOKEN, VOCAB_SIZE
from tests.prometheus_tools import http_get, promtool, query, rule_health_errors, running_prometheus, scrape, wait_for

pytestmark = pytest.mark.slow

CACHE_TOKENS = 3000
NEW_TOKENS = 6
PROMPT_LENGTH = 5
START_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def metered(make_swarm, connect, tiny_model_dir) -> dict[str, object]:
    """One peer exporting metrics on a free port; scraped before and after one greedy generation through it."""
    model_dir = tiny_model_dir("llama", 2)
    local_swarm = make_swarm(
        model_dir, [(0, 2)], peer_args=["--metrics-port", "0", "--cache-tokens", str(CACHE_TOKENS)]
    )
    url = local_swarm.metrics_url(local_swarm.peers[0])
    before = scrape(url)
    distributed = connect(model_dir, local_swarm)
    prompts = torch.randint(
        FIRST_ORDINARY_TOKEN, VOCAB_SIZE, (1, PROMPT_LENGTH), generator=torch.Generator().manual_seed(0)
    )
    distributed.generate(prompts, max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1, eos_token_id=None)
    # the session's request is counted when its stream closes, which the client does after generate returns
    after = wait_for(
        lambda: (s := scrape(url)).get('blockswarm_rpc_requests_total{rpc="inference",status="ok"}', 0) >= 1 and s,
        START_TIMEOUT,
        "the inference session to be counted",
    )
    return {"url": url, "port": int(url.split(":")[2].split("/")[0]), "before": before, "after": after}


def test_metrics_count_a_generation(metered: dict) -> None:
    before, after = metered["before"], metered["after"]
    assert before['blockswarm_tokens_processed_total{phase="decode"}'] == 0
    assert after['blockswarm_tokens_processed_total{phase="prefill"}'] == PROMPT_LENGTH
    assert after['blockswarm_tokens_processed_total{phase="decode"}'] == NEW_TOKENS - 1
    assert after["blockswarm_inference_sessions_total{}"] >= 1
    assert after["blockswarm_inference_sessions_active{}"] == 0
    assert after['blockswarm_rpc_requests_total{rpc="inference",status="ok"}'] >= 1
    assert after['blockswarm_rpc_requests_total{rpc="inference",status="internal"}'] == 0
    assert after['blockswarm_rpc_duration_seconds_count{rpc="inference"}'] >= 1
    assert after['blockswarm_inference_step_duration_seconds_count{phase="prefill"}'] == 1
    assert after['blockswarm_inference_step_duration_seconds_count{phase="decode"}'] == NEW_TOKENS - 1
    assert after['blockswarm_network_bytes_total{direction="in"}'] > 0
    assert after['blockswarm_network_bytes_total{direction="out"}'] > 0
    assert after["blockswarm_kv_cache_limit_tokens{}"] == CACHE_TOKENS
    assert after["blockswarm_kv_cache_used_tokens{}"] == 0
    assert after['blockswarm_peer_state{state="online"}'] == 1
    assert after['blockswarm_peer_state{state="joining"}'] == 0
    assert after["blockswarm_peer_blocks_served{}"] == 2
    assert (after["blockswarm_peer_block_start{}"], after["blockswarm_peer_block_end{}"]) == (0, 2)
    assert after['blockswarm_dht_announcements_total{status="ok"}'] >= 2  # JOINING, then ONLINE
    assert after["blockswarm_dht_last_announce_timestamp_seconds{}"] > 1.6e9
    assert after["blockswarm_peer_announced_throughput_tokens_per_second{}"] > 0
    assert after["blockswarm_dht_peers_seen{}"] >= 1  # the bootstrap node
    (info,) = [name for name in after if name.startswith("blockswarm_peer_info{")]
    assert 'span="0:2"' in info and 'dtype="float32"' in info
    # bounded labels only: the peer id appears in the info series and nowhere else
    assert all("peer_id" not in name for name in after if not name.startswith("blockswarm_peer_info{"))


def test_promtool_check_metrics_passes(metered: dict) -> None:
    result = promtool("check", "metrics", stdin=http_get(metered["url"]))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def prometheus(metered: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_prometheus(
        tmp_path_factory.mktemp("prometheus"), {"blockswarm-peer": [f"127.0.0.1:{metered['port']}"]}
    ) as url:
        yield url


def test_prometheus_scrapes_live_peer(prometheus: str) -> None:
    wait_for(
        lambda: [r for r in query(prometheus, 'up{job="blockswarm-peer"}') if r["value"][1] == "1"],
        START_TIMEOUT,
        "Prometheus to report the peer up",
    )
    (tokens,) = wait_for(
        lambda: query(prometheus, 'blockswarm_tokens_processed_total{phase="decode"} > 0'),
        START_TIMEOUT,
        "the decode tokens counter in Prometheus",
    )
    assert float(tokens["value"][1]) == NEW_TOKENS - 1
    (limit,) = query(prometheus, "blockswarm_kv_cache_limit_tokens")
    assert float(limit["value"][1]) == CACHE_TOKENS
    assert not rule_health_errors(prometheus)
