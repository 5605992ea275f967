"""blockswarm: run and fine-tune large language models across a peer-to-peer swarm.

* client/        the distributed model: local embeddings and head, remote blocks, routing, sessions
* models/        slicing any decoder-only transformers model into block ranges (peer and client share it)
* protocol.py    the wire contract: DHT keys and records, RPC names, request metadata
* directory.py   reading and writing swarm records in the DHT
* messages.py    tensors + metadata in hivemind protobufs
* compression.py hivemind tensor (de)serialisation, with every CompressionType working on numpy 2
* config.py      `ClientConfig`
* errors.py      the exception tree
* process.py     running swarm processes safely (tests, demo, benchmarks)
* logs.py        logging set-up for entry points
* cli.py         the `swarm` command
"""

__version__ = "0.1.0"

from swarm.client.remote_model import AutoDistributedModelForCausalLM, DistributedModelForCausalLM
from swarm.config import ClientConfig

__all__ = ["AutoDistributedModelForCausalLM", "ClientConfig", "DistributedModelForCausalLM", "__version__"]
