"""The parts of a model that stay on the client: embeddings before block 0, final norm and LM head after.

Keeping them local means the swarm sees hidden states only, never token ids or logits.
"""

from __future__ import annotations

import torch
from torch import nn

from swarm.models.layout import ModelLayout
from swarm.models.shared_pass import SharedPass


class ClientModules(nn.Module):
    """Token embeddings (+ learned positions, + embedding norm) and final norm + LM head of one model."""

    def __init__(
        self,
        layout: ModelLayout,
        embeddings: nn.Module,
        final_norm: nn.Module,
        lm_head: nn.Module,
        position_embeddings: nn.Module | None = None,
        embedding_norm: nn.Module | None = None,
    ):
        super().__init__()
        self.layout = layout
        self.embeddings = embeddings
        self.position_embeddings = position_embeddings
        self.embedding_norm = embedding_norm
        self.final_norm = final_norm
        self.lm_head = lm_head
        self._head_pass = SharedPass()

    def embed(self, input_ids: torch.Tensor, position: int = 0) -> torch.Tensor:
        """Hidden states entering block 0 for tokens that start at `position`."""
        return self.embed_vectors(self.embeddings(input_ids), position)

    def embed_vectors(self, token_vectors: torch.Tensor, position: int = 0) -> torch.Tensor:
        """Hidden states entering block 0 for [batch, seq, hidden] token embeddings (or vectors standing for them,
        such as soft prompts) that start at `position`: learned positions and the embedding norm are applied."""
        hidden = token_vectors
        if self.position_embeddings is not None:
            positions = torch.arange(position, position + hidden.shape[1], device=hidden.device)
            hidden = hidden + self.position_embeddings(positions.unsqueeze(0))
        if self.embedding_norm is not None:
            hidden = self.embedding_norm(hidden)
        return hidden

    def logits(self, hidden_states: torch.Tensor, caller: object | None = None) -> torch.Tensor:
        """Logits from the hidden states leaving the last block. Without autograd, threads that ask at the same
        time (concurrent generations in one process) share a pass through the head (`SharedPass`); a `caller`
        that names itself (its inference session) is waited for by the others' passes while it decodes."""
        return self._head_pass.run(self._head, hidden_states, caller)

    def head_pass_counts(self) -> tuple[int, int]:
        """(calls of `logits` that could share a pass, passes run for them) so far: how far concurrent
        generations in this process shared the head."""
        return self._head_pass.calls, self._head_pass.passes

    def _head(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.final_norm(hidden_states))
