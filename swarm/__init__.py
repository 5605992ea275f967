"""blockswarm: run and fine-tune large language models across a peer-to-peer swarm.

  * models/        slicing any decoder-only transformers model into block ranges (peer and client share it)
  * errors.py      the exception tree
  * compression.py hivemind tensor (de)serialisation, with every CompressionType working on numpy 2
  * logs.py        logging set-up for entry points
  * cli.py         the `swarm` command
"""

__version__ = "0.1.0"
