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

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits from the hidden states leaving the last block. Without autograd, threads that ask at the same
        time (concurrent generations in one process) share a pass through the head (`SharedPass`)."""
        return self._head_pass.run(self._head, hidden_states)

    def _head(self, hidden_states: torch.Tensor) -> torch.Tensor:
        normed = self.final_norm(hidden_states)
        if _transposed_is_faster(self.lm_head, normed):
            return (self.lm_head.weight @ normed.reshape(-1, normed.shape[-1]).T).T.reshape(*normed.shape[:-1], -1)
        return self.lm_head(normed)


def _transposed_is_faster(head: nn.Module, inputs: torch.Tensor) -> bool:
    """Whether [vocab, hidden] @ inputs.T beats the linear layer's inputs @ [vocab, hidden].T: for 2 to 32 rows in
    float32 on a CPU, torch's BLAS (MKL here) picks a slow kernel for the latter. Measured on one thread, with a
    32000 x 512 head: 2 rows 12.9 against 7.6 ms, 4 rows 13.6 against 7.3 ms, 8 rows 16.1 against 12.1 ms, 32
    rows 29.4 against 23.7 ms (one row: 6.0 either way); alike with 32000 x 2048 and 50000 x 768. Only without
    autograd and without hooks on the head, which the product would bypass."""
    rows = inputs.numel() // inputs.shape[-1]
    return (
        type(head) is nn.Linear
        and head.bias is None
        and not torch.is_grad_enabled()
        and not (head._forward_hooks or head._forward_pre_hooks)
        and inputs.device.type == "cpu"
        and inputs.dtype == head.weight.dtype == torch.float32
        and 1 < rows <= 32
    )
