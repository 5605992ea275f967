"""The block server: `swarm-peer MODEL --blocks START:END` serves a range of a model's decoder blocks.

* __main__.py   command line (configargparse) -> `PeerConfig` -> `run_peer`
* config.py     `PeerConfig`, `parse_blocks`
* server.py     lifecycle and composition root: DHT, load blocks, serve, announce, leave
* handler.py    RPC surface: decode -> validate -> runtime -> encode
* runtime.py    `BlockRuntime`: torch work, one job at a time (an executor thread; quick decode batches on the loop)
* kv_cache.py   `KVCacheBudget`: admission of inference sessions against --cache-tokens
* announcer.py  `Announcer`: renews the DHT records, OFFLINE on shutdown
* throughput.py measured tokens/s of the hosted blocks
"""
