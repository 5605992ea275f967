"""The `swarm-dht` command: one hivemind DHT node that stores no blocks and only welcomes others into the swarm.

Peers and clients join the swarm through its multiaddr, which it prints to stdout as `--initial-peers MADDR` lines;
`--identity-path` keeps its peer id, and so that multiaddr, the same across restarts. Everything lives in
`__main__.py`: configargparse -> `BootstrapConfig` -> a `hivemind.DHT` that runs until SIGINT or SIGTERM.
"""
