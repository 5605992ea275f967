"""Slicing any decoder-only transformers causal LM into runnable block ranges.

* checkpoint.py     `Checkpoint`: tensor names of a local or cached checkpoint; reads only requested tensors
* layout.py         `ModelLayout`, `probe_layout`: where embeddings, blocks, norm and head live; refuses
                    architectures it cannot place
* block_slice.py    `BlockSlice`: blocks [start, end) with a per-session KV cache (`new_cache()`)
* session_attention.py  per-session attention for a batch of decode steps, without gathering the caches
* client_modules.py `ClientModules`: embeddings before block 0, final norm + LM head after the last block
* loading.py        `ModelSource.open`, `load_block_slice`, `load_client_modules`: build them from a checkpoint
* weight_layout.py  wide float32 linear weights stored column-major on a CPU, where decode steps read them faster
* lora.py           LoRA target layers of a block; a peer's per-request check and application of an adapter
"""

from swarm.models.block_slice import BlockSlice
from swarm.models.checkpoint import Checkpoint, CheckpointStatistics
from swarm.models.client_modules import ClientModules
from swarm.models.layout import ModelLayout
from swarm.models.loading import ModelSource, load_block_slice, load_client_modules, resolve_dtype

__all__ = [
    "BlockSlice",
    "Checkpoint",
    "CheckpointStatistics",
    "ClientModules",
    "ModelLayout",
    "ModelSource",
    "load_block_slice",
    "load_client_modules",
    "resolve_dtype",
]
