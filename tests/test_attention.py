"""Attention: masked softmax, Bahdanau and Luong shapes, padding, mixed precision."""

from __future__ import annotations

import pytest
import torch

from seq2seq.models.rnn.attention import BahdanauAttention, LuongAttention, make_attention, masked_softmax

BATCH, TGT, SRC, QUERY, KEY = 3, 4, 6, 5, 7
LENGTHS = torch.tensor([6, 2, 4])


def mask() -> torch.Tensor:
    return torch.arange(SRC).unsqueeze(0) < LENGTHS.unsqueeze(1)  # (BATCH, SRC)


def inputs(query_size: int = QUERY, key_size: int = KEY):
    torch.manual_seed(0)
    return torch.randn(BATCH, TGT, query_size), torch.randn(BATCH, SRC, key_size)


def attentions() -> list[tuple[str, torch.nn.Module, int]]:
    torch.manual_seed(1)
    return [("bahdanau", BahdanauAttention(QUERY, KEY, 8), KEY),
            ("general", LuongAttention(QUERY, KEY, "general"), KEY),
            ("dot", LuongAttention(QUERY, QUERY, "dot"), QUERY)]


def check_weights(weights: torch.Tensor) -> None:
    assert weights.dtype == torch.float32
    assert weights.shape == (BATCH, TGT, SRC)
    torch.testing.assert_close(weights.sum(-1), torch.ones(BATCH, TGT))
    assert torch.all(weights.masked_select(~mask().unsqueeze(1).expand_as(weights)) == 0)


def test_masked_softmax_is_exactly_zero_on_padding_and_rows_sum_to_one():
    scores = torch.randn(BATCH, TGT, SRC) * 10
    scores[..., -1] = 1e4  # a huge score on a padded position must still get nothing
    check_weights(masked_softmax(scores, mask()))


def test_masked_softmax_returns_float32_for_bfloat16_scores():
    weights = masked_softmax(torch.randn(BATCH, TGT, SRC, dtype=torch.bfloat16), mask())
    check_weights(weights)


@pytest.mark.parametrize("index", range(3))
def test_shapes_and_padding(index):
    name, attention, key_size = attentions()[index]
    query, keys = inputs(key_size=key_size)
    context, weights = attention(query, attention.project_keys(keys), keys, mask())
    assert context.shape == (BATCH, TGT, key_size), name
    check_weights(weights)
    # what sits in the padding never reaches the context
    noisy = keys.clone()
    noisy[~mask()] = 100.0
    context2, _ = attention(query, attention.project_keys(noisy), noisy, mask())
    torch.testing.assert_close(context, context2)


@pytest.mark.parametrize("index", range(3))
def test_weights_are_float32_under_bfloat16_autocast(index):
    _, attention, key_size = attentions()[index]
    query, keys = inputs(key_size=key_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        context, weights = attention(query, attention.project_keys(keys), keys, mask())
    check_weights(weights)
    assert context.shape == (BATCH, TGT, key_size)


@pytest.mark.parametrize("index", range(3))
def test_one_query_step_matches_the_same_step_in_a_batch_of_steps(index):
    """One step takes its own path for Luong scores (multiply and sum, not a batched
    product): context and weights are those of the same step among many."""
    _, attention, key_size = attentions()[index]
    query, keys = inputs(key_size=key_size)
    proj = attention.project_keys(keys)
    context, all_steps = attention(query, proj, keys, mask())
    one_context, one_step = attention(query[:, 2:3], proj, keys, mask())
    torch.testing.assert_close(one_step[:, 0], all_steps[:, 2])
    torch.testing.assert_close(one_context[:, 0], context[:, 2])


def test_bahdanau_projects_keys_to_the_attention_size():
    attention = BahdanauAttention(QUERY, KEY, 9)
    assert attention.project_keys(torch.randn(BATCH, SRC, KEY)).shape == (BATCH, SRC, 9)


def test_dot_with_mismatched_sizes_raises():
    with pytest.raises(ValueError, match="'dot' attention needs equal query and key sizes"):
        LuongAttention(QUERY, KEY, "dot")
    with pytest.raises(ValueError, match="must be 'dot' or 'general'"):
        LuongAttention(QUERY, KEY, "concat")


def test_make_attention():
    assert make_attention(None, QUERY, KEY, 8) is None
    assert isinstance(make_attention("bahdanau", QUERY, KEY, 8), BahdanauAttention)
    general = make_attention("general", QUERY, KEY, 8)
    assert isinstance(general, LuongAttention) and general.method == "general"
    assert make_attention("dot", QUERY, QUERY, 8).key_layer is None
