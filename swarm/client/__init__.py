"""The client: local embeddings and LM head, remote blocks, routes through the swarm.

* remote_model.py   `AutoDistributedModelForCausalLM`: a transformers `GenerationMixin` model
* session.py        `InferenceSession`: steps through a route with server-side KV caches
* remote_blocks.py  `RemoteBlocks`: stateless, differentiable forward/backward through the swarm (+ LoRA)
* tuning.py         `TuningConfig`: what a client trains (ptune, lora, head/embeddings); `SoftPrompts`
* lora.py           `LoraAdapters`: the client's LoRA parameters, saved in PEFT's format
* swarm_client.py   `SwarmClient`: DHT, P2P, latencies, bans, route choice
* routing.py        `choose_route`: pure shortest path over the announced spans
* transport.py      calls to one peer; foreign errors mapped to `PeerError`s once
* metrics.py        time to first token, inter-token latency and reroutes, in prometheus_client's default registry
* _sync.py          the one client event-loop thread for synchronous callers
"""
