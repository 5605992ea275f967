"""The exporters' label sets and the shipped monitoring assets, checked without a swarm: alert rules pass
`promtool check rules` and their `promtool test rules` unit tests, the example config loads, and dashboards are
plain JSON whose queries are valid PromQL and whose panels all read the `datasource` variable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from monitoring.peer_metrics import STATES, STATUSES, PeerMetrics, PeerStatistics
from swarm.protocol import ErrorKind, ServerState
from tests.prometheus_tools import MONITORING_DIR, dashboard_queries, promtool

PROMETHEUS_DIR = MONITORING_DIR / "prometheus"
DASHBOARDS = sorted((MONITORING_DIR / "grafana" / "dashboards").glob("*.json"))
RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))
DATASOURCE = "${datasource}"


def _check(*args: str | Path) -> None:
    result = promtool(*args)
    assert result.returncode == 0, result.stdout + result.stderr


def test_label_sets_follow_the_protocol() -> None:
    assert set(STATUSES) == {"ok", "cancelled", *(kind.value for kind in ErrorKind)}
    assert set(STATES) == {state.value for state in ServerState}


def test_peer_metrics_exposition_passes_promtool() -> None:
    metrics = PeerMetrics(CollectorRegistry())
    metrics.set_peer(version="0", model="m", model_prefix="m", start=2, end=5, dtype="float32", peer_id="QmPeer")
    metrics.set_statistics_source(lambda: PeerStatistics("online", 10, 100, 1, 3, 1, 4, 0, 1.7e9, 12.5, 2))
    metrics.record_request("inference", "ok", 0.2, 100, 200)
    metrics.record_step("prefill", 0.01, 7)
    text = generate_latest(metrics.registry).decode()
    assert 'blockswarm_tokens_processed_total{phase="decode"} 0.0' in text  # pre-created label sets
    assert 'blockswarm_rpc_requests_total{rpc="backward",status="internal"} 0.0' in text
    assert "blockswarm_kv_cache_limit_tokens 100.0" in text
    assert [line for line in text.splitlines() if "QmPeer" in line] == [
        'blockswarm_peer_info{dtype="float32",model="m",model_prefix="m",peer_id="QmPeer",span="2:5",version="0"} 1.0'
    ]
    result = promtool("check", "metrics", stdin=text)
    assert result.returncode == 0, result.stdout + result.stderr


def test_two_peers_in_one_process_do_not_collide() -> None:
    first, second = PeerMetrics(CollectorRegistry()), PeerMetrics(CollectorRegistry())
    first.record_tokens("decode", 3)
    assert second.registry.get_sample_value("blockswarm_tokens_processed_total", {"phase": "decode"}) == 0


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda path: path.name)
def test_rules_pass_promtool_check(path: Path) -> None:
    _check("check", "rules", path)


@pytest.mark.parametrize("path", RULE_TESTS, ids=lambda path: path.name)
def test_rule_unit_tests_pass(path: Path) -> None:
    _check("test", "rules", path)


def test_every_alert_has_a_unit_test() -> None:
    alerts = {rule["alert"] for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]
              for rule in group["rules"] if "alert" in rule}  # fmt: skip
    tested = {case["alertname"] for path in RULE_TESTS for test in yaml.safe_load(path.read_text())["tests"]
              for case in test.get("alert_rule_test", [])}  # fmt: skip
    assert alerts and alerts <= tested, f"alerts without a promtool unit test: {sorted(alerts - tested)}"


def test_example_prometheus_config_is_valid() -> None:
    _check("check", "config", PROMETHEUS_DIR / "prometheus.yml")


def test_provisioning_files_parse() -> None:
    provisioning = MONITORING_DIR / "grafana" / "provisioning"
    (datasources,) = (provisioning / "datasources").glob("*.yml")
    assert yaml.safe_load(datasources.read_text())["datasources"][0]["type"] == "prometheus"
    (providers,) = (provisioning / "dashboards").glob("*.yml")
    assert yaml.safe_load(providers.read_text())["providers"][0]["type"] == "file"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda path: path.name)
def test_dashboard_is_plain_json_on_the_datasource_variable(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    assert "__inputs" not in dashboard and "__requires" not in dashboard  # not an "export for sharing" file
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {path.name}"
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        assert all(target["datasource"]["uid"] == DATASOURCE for target in panel["targets"]), panel["title"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda path: path.name)
def test_dashboard_queries_are_valid_promql(path: Path, tmp_path: Path) -> None:
    """Grafana's variables replaced by values, each query becomes a recording rule that promtool must accept."""
    queries = [query for query in dashboard_queries(path) if not query.startswith("label_values(")]
    grafana_values = {"$__rate_interval": "5m", "$instance": ".*", "$model": ".*"}
    rules = []
    for i, query in enumerate(queries):
        for variable, value in grafana_values.items():
            query = query.replace(variable, value)
        rules.append({"record": f"blockswarm:dashboard_query_{i}", "expr": query})
    rule_file = tmp_path / "dashboard_queries.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": path.stem, "rules": rules}]}))
    _check("check", "rules", rule_file)
