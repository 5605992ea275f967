"""Greedy decoding through a bare `InferenceSession`, as several tests drive concurrent sessions."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import torch

from swarm import DistributedModelForCausalLM
from swarm.client._sync import run_sync
from swarm.client.session import InferenceSession


async def greedy_in_session(model: DistributedModelForCausalLM, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """`prompt` followed by `new_tokens` greedy tokens, one session step per token (no `generate`): sessions
    started side by side reach the peers together, which batch their decode steps."""
    session = InferenceSession(model.swarm, prompt.shape[1] + new_tokens)
    tokens, hidden = prompt, model.client_modules.embed(prompt)
    try:
        with torch.no_grad():
            for _ in range(new_tokens):
                outputs = await session.step(hidden)
                token = model.client_modules.logits(outputs[:, -1:].to(hidden)).argmax(-1)
                tokens = torch.cat([tokens, token], dim=1)
                hidden = model.client_modules.embed(token, session.position)
    finally:
        await session.close()
    return tokens


def greedy_side_by_side(
    model: DistributedModelForCausalLM, prompts: Sequence[torch.Tensor], new_tokens: int
) -> list[torch.Tensor]:
    """`greedy_in_session` for every prompt at once, on the client's loop."""

    async def all_sessions() -> list[torch.Tensor]:
        return list(await asyncio.gather(*(greedy_in_session(model, prompt, new_tokens) for prompt in prompts)))

    return run_sync(all_sessions())
