"""swarm-monitor: crawls the DHT on a period and shows the swarm as Prometheus metrics, JSON and an HTML page.

Data path: `crawler.crawl` (DHT records, peer pings) -> `state.SwarmSnapshot` -> `metrics` (read at scrape time)
and `web` (`/metrics`, `/api/v1/state`, `/`). `__main__` runs the crawl loop and the web server.
"""
