"""blockswarm: run and fine-tune large language models across a peer-to-peer swarm.

  * client/        the distributed model: local embeddings and head, remote blocks, routing, sessions
  * training/      `swarm finetune`: trainers that average gradients; gateway/: `swarm serve`
  * models/        slicing any decoder-only transformers model into block ranges (peer and client share it)
  * protocol.py    the wire contract: DHT keys and records, RPC names, request metadata
  * directory.py   reading and writing swarm records in the DHT
  * dht.py         starting hivemind's DHT process the way every blockswarm process needs it
  * messages.py    tensors + metadata in hivemind protobufs
  * compression.py hivemind tensor (de)serialisation, with every CompressionType working on numpy 2
  * config.py      `ClientConfig`
  * errors.py      the exception tree
  * process.py     running swarm processes safely; testing.py: `LocalSwarm` on loopback
  * logs.py        logging set-up for entry points
  * command_line.py  the settings parser of swarm-dht, swarm-peer and swarm-monitor
  * cli.py         the `swarm` command; demo.py: `swarm demo`; demo_model.py: the shipped demo model
  * asyncio_compat.py  `asyncio.timeout` on every supported Python

The public API below is imported on first use, so `swarm-dht` and `swarm-peer` do not pay for the client.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "AutoDistributedModelForCausalLM": "swarm.client.remote_model",
    "DistributedModelForCausalLM": "swarm.client.remote_model",
    "ClientConfig": "swarm.config",
    "TuningConfig": "swarm.client.tuning",
}
__all__ = [
    "AutoDistributedModelForCausalLM",
    "ClientConfig",
    "DistributedModelForCausalLM",
    "TuningConfig",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'swarm' has no attribute {name!r}")
