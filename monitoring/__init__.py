"""blockswarm monitoring: Prometheus exporters and the dashboards and alert rules that read them.

  * peer_metrics.py   metric names, help, buckets and label sets of a peer (`swarm-peer --metrics-port`),
                      `PeerStatistics` (the scrape-time record a peer fills) and `serving_metrics`
  * prometheus/       an example `prometheus.yml`, alert rules in `rules/` and their `promtool test rules` tests
  * grafana/          dashboards (plain JSON with a `datasource` variable) and provisioning YAML

`monitoring` never imports `peer`: the peer imports this package and hands it plain records (vLLM's record/export
split), so exporters stay testable without a model and the metric names live in one place.
"""
