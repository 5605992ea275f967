"""Concurrent greedy sessions, as the tests of batched decoding drive them."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import torch

from swarm import DistributedModelForCausalLM
from swarm.bench import greedy_session
from swarm.client._sync import run_sync


def greedy_side_by_side(
    model: DistributedModelForCausalLM, prompts: Sequence[torch.Tensor], new_tokens: int
) -> list[torch.Tensor]:
    """Each prompt followed by its `new_tokens` greedy tokens, the sessions running at once on the client's loop
    (`swarm.bench.greedy_session`), so that the peers batch their decode steps."""

    async def all_sessions() -> list[torch.Tensor]:
        runs = await asyncio.gather(*(greedy_session(model, prompt, new_tokens) for prompt in prompts))
        return [run.tokens for run in runs]

    return run_sync(all_sessions())
