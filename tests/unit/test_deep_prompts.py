"""deep-ptune's per-block prompts on a peer's blocks: the checks and the per-request hooks; saved prompts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from swarm.client.tuning import SoftPrompts
from swarm.errors import ConfigError, ProtocolError
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


def test_an_inference_step_gets_only_the_prompt_positions_it_covers() -> None:
    prompts = torch.arange(1.0, 4.0).view(1, 3, 1).expand(1, 3, 2)  # one block, 3 positions: +1, +2, +3
    hidden = torch.zeros(1, 2, 2)
    blocks = [_Block()]
    with applied_prompts(blocks, prompts, position=2):  # a step holding positions 2 and 3
        covered = blocks[0](hidden)
    with applied_prompts(blocks, prompts, position=5):
        past = blocks[0](hidden)
    torch.testing.assert_close(covered[0, :, 0], torch.tensor([3.0, 0.0]))
    torch.testing.assert_close(past, hidden)


def test_soft_prompts_round_trip_and_a_mismatched_file_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    prompts = SoftPrompts(3, 8, num_blocks=2)
    with torch.no_grad():
        prompts.block_prompts.normal_()
    prompts.save_pretrained(tmp_path)
    loaded = SoftPrompts.from_pretrained(tmp_path, hidden_size=8, num_blocks=2)
    torch.testing.assert_close(loaded.prompts, prompts.prompts, atol=0, rtol=0)
    torch.testing.assert_close(loaded.block_prompts, prompts.block_prompts, atol=0, rtol=0)
    with pytest.raises(ConfigError, match=r"'block_prompts' must be \[4, 3, 8\]"):
        SoftPrompts.from_pretrained(tmp_path, hidden_size=8, num_blocks=4)
    with pytest.raises(ConfigError, match=r"'prompts' must be \[pre_seq_len, 16\]"):
        SoftPrompts.from_pretrained(tmp_path, hidden_size=16, num_blocks=2)
    with pytest.raises(ConfigError, match="cannot read soft prompts"):
        SoftPrompts.from_pretrained(tmp_path / "missing", hidden_size=8, num_blocks=2)
