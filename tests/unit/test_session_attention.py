"""Per-session attention (`swarm.models.session_attention`): each session's rows attend over its own keys and
values only, through the columns of the batch's mask that are its own positions."""

from __future__ import annotations

import torch
from torch import nn

from swarm.models.session_attention import SessionStates, per_session_sdpa


class _Attention(nn.Module):
    is_causal = True
    num_key_value_groups = 1


def test_each_session_attends_over_its_own_states_through_its_own_mask_columns() -> None:
    generator = torch.Generator().manual_seed(0)
    heads, head_dim, rows, lengths = 2, 8, (1, 2), (3, 6)  # cached tokens + the step's
    query = torch.randn(sum(rows), heads, 1, head_dim, generator=generator)
    shapes = [(count, heads, length, head_dim) for count, length in zip(rows, lengths, strict=True)]
    keys = [torch.randn(shape, generator=generator) for shape in shapes]
    values = [torch.randn(shape, generator=generator) for shape in shapes]
    mask = torch.ones(sum(rows), 1, 1, max(lengths), dtype=torch.bool)  # sized to the longest session
    mask[1:, ..., 2] = False  # the second session's rows do not see its third token

    output, weights = per_session_sdpa(
        _Attention(), query, SessionStates(tuple(keys), rows), SessionStates(tuple(values), rows), mask, scaling=0.5
    )

    assert weights is None and output.shape == (sum(rows), 1, heads, head_dim)
    for first, count, session_keys, session_values, seen in (
        (0, 1, keys[0], values[0], [0, 1, 2]),
        (1, 2, keys[1], values[1], [0, 1, 3, 4, 5]),
    ):
        attended = nn.functional.scaled_dot_product_attention(
            query[first : first + count], session_keys[:, :, seen], session_values[:, :, seen], scale=0.5
        )
        torch.testing.assert_close(output[first : first + count], attended.transpose(1, 2), atol=1e-6, rtol=0)
