"""deep-ptune's per-block prompts on a peer's blocks: the checks and the per-request hooks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from swarm.errors import ProtocolError
from swarm.models.deep_prompts import applied_prompts, check_prompts


class _Block(nn.Module):
    def forward(self, hidden_states: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return hidden_states * scale


def test_check_prompts_names_the_problem() -> None:
    blocks = [_Block(), _Block()]
    hidden = torch.zeros(3, 5, 8)
    check_prompts(blocks, torch.zeros(2, 4, 8), hidden)
    for prompts, message in [
        (torch.zeros(3, 4, 8), r"\[2, pre_seq_len, 8\]"),
        (torch.zeros(2, 4, 7), r"\[2, pre_seq_len, 8\]"),
        (torch.zeros(2, 6, 8), "do not fit 5 positions"),
        (torch.zeros(2, 4, 8, dtype=torch.float64), "float64"),
    ]:
        with pytest.raises(ProtocolError, match=message):
            check_prompts(blocks, prompts, hidden)


def test_prompts_are_added_to_each_block_input_only_inside_the_with() -> None:
    blocks = [_Block(), _Block()]
    hidden = torch.randn(2, 4, 8)
    prompts = torch.randn(2, 3, 8)
    with applied_prompts(blocks, prompts):
        first = blocks[0](hidden)  # positional hidden states
        second = blocks[1](hidden_states=hidden, scale=2.0)  # keyword hidden states
    expected = hidden.clone()
    expected[:, :3] += prompts[0]
    torch.testing.assert_close(first, expected)
    expected = hidden.clone()
    expected[:, :3] += prompts[1]
    torch.testing.assert_close(second, 2.0 * expected)
    torch.testing.assert_close(blocks[0](hidden), hidden, atol=0, rtol=0)  # the hooks are gone
