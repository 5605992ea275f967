"""Speculative decoding: a small local draft model proposes tokens, the swarm checks several of them in one step.

Every token of plain decoding costs a round trip through the whole chain of peers. Here the draft model (same
tokenizer, run locally with its own KV cache) guesses the next `num_draft_tokens` tokens; one session step sends
the last accepted token and the guesses through the swarm, whose logits give the target model's greedy choice
after each of them. The guesses are accepted up to the first one the target disagrees with, and the target's
own token is appended (a correction, or a bonus token when every guess was right): between 1 and
`num_draft_tokens + 1` tokens per round trip, and the output is exactly the target's greedy output.

Rejected guesses are already in the peers' KV caches; the next step starts at the accepted position, and the
peers roll their caches back to it (peer/handler.py). The draft's own cache is cropped the same way.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from swarm.client.remote_model import DistributedModelForCausalLM, common_prefix_length
from swarm.errors import ConfigError


@dataclass(frozen=True, slots=True)
class SpeculativeStats:
    rounds: int  # session steps through the swarm after the prompt
    drafted: int  # tokens the draft model proposed
    accepted: int  # of which the target agreed with

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@torch.no_grad()
def speculative_generate(
    model: DistributedModelForCausalLM,
    draft: PreTrainedModel,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    num_draft_tokens: int = 4,
    eos_token_id: int | None = None,
) -> tuple[torch.Tensor, SpeculativeStats]:
    """Greedy generation of up to `max_new_tokens` tokens after `input_ids` [1, seq], equal to
    `model.generate(input_ids, do_sample=False)`, checked `num_draft_tokens` at a time; stops after `eos_token_id`."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ConfigError("speculative decoding takes one sequence: input_ids of shape [1, seq]")
    if num_draft_tokens < 1 or max_new_tokens < 1:
        raise ConfigError("num_draft_tokens and max_new_tokens must be positive")
    if draft.config.vocab_size != model.config.vocab_size:
        raise ConfigError(
            f"the draft model's vocabulary ({draft.config.vocab_size}) differs from the model's "
            f"({model.config.vocab_size}); the draft must share the tokenizer"
        )
    prompt_length = input_ids.shape[1]
    tokens = input_ids
    drafter = _Drafter(draft)
    rounds = drafted = accepted = 0
    max_length = prompt_length + max_new_tokens + num_draft_tokens
    with model.inference_session(max_length=max_length):
        while tokens.shape[1] - prompt_length < max_new_tokens:
            guesses = drafter.propose(tokens, min(num_draft_tokens, max_new_tokens - (tokens.shape[1] - prompt_length)))
            logits = model(torch.cat([tokens, guesses], dim=1)).logits  # rolls back what was rejected last round
            choices = logits[:, -(guesses.shape[1] + 1) :].argmax(-1)  # the target's token after each position
            agreed = int((choices[0, :-1] == guesses[0]).long().cumprod(0).sum())
            new = torch.cat([guesses[:, :agreed], choices[:, agreed : agreed + 1]], dim=1)
            rounds, drafted, accepted = rounds + 1, drafted + guesses.shape[1], accepted + agreed
            if eos_token_id is not None and bool((new == eos_token_id).any()):
                new = new[:, : int((new[0] == eos_token_id).nonzero()[0]) + 1]
                tokens = torch.cat([tokens, new], dim=1)
                break
            tokens = torch.cat([tokens, new], dim=1)
    tokens = tokens[:, : prompt_length + max_new_tokens]
    return tokens, SpeculativeStats(rounds, drafted, accepted)


class _Drafter:
    """The draft model with a KV cache that follows the accepted tokens (cropped after each rejection)."""

    def __init__(self, draft: PreTrainedModel):
        self.draft = draft.eval()
        self.cache = DynamicCache(config=draft.config)
        parameters = inspect.signature(draft.forward).parameters
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"  # renamed in transformers 5.24
        self.seen: torch.Tensor | None = None  # the tokens whose keys and values the cache holds

    def propose(self, tokens: torch.Tensor, count: int) -> torch.Tensor:
        """`count` greedy guesses after `tokens`."""
        common = 0 if self.seen is None else common_prefix_length(self.seen, tokens)
        if common == tokens.shape[1]:
            common -= 1  # recompute the last token: its logits are needed
        self.cache.crop(common - self.cache.get_seq_length())
        pending, guesses = tokens[:, common:], []
        for _ in range(count):
            logits = self.draft(input_ids=pending, use_cache=True, **{self._cache_argument: self.cache}).logits
            pending = logits[:, -1:].argmax(-1)
            guesses.append(pending)
        self.seen = torch.cat([tokens, *guesses[:-1]], dim=1)  # the last guess was never fed back
        return torch.cat(guesses, dim=1)
