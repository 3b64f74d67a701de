"""Attention: Bahdanau (additive) and Luong (``dot``, ``general``) scores, masked softmax.

Both classes split the work in two: ``project_keys`` runs once per batch, before the decoder's
step loop, and ``forward`` scores one or many decoder steps against those projected keys.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def masked_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    """Softmax over source positions in float32 (or float64), with exactly zero weight on padding.

    Args:
        scores: (batch, tgt_len, src_len) in any float dtype (bf16 under autocast).
        mask: (batch, src_len) bool, True at real positions; every row has one True.

    Returns:
        (batch, tgt_len, src_len) float32 weights (float64 for float64 scores); each row sums
        to 1.
    """
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
    scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
    return torch.softmax(scores, dim=-1)


class BahdanauAttention(nn.Module):
    """Additive attention: score(q, k) = v^T tanh(W_q q + W_k k)."""

    def __init__(self, query_size: int, key_size: int, attention_size: int) -> None:
        super().__init__()
        self.key_layer = nn.Linear(key_size, attention_size, bias=False)
        self.query_layer = nn.Linear(query_size, attention_size, bias=False)
        self.energy_layer = nn.Linear(attention_size, 1, bias=False)
        self.activation = nn.Tanh()

    def project_keys(self, keys: Tensor) -> Tensor:
        """(batch, src_len, key_size) -> (batch, src_len, attention_size)."""
        return self.key_layer(keys)

    def forward(self, query: Tensor, proj_keys: Tensor, values: Tensor,
                mask: Tensor) -> tuple[Tensor, Tensor]:
        """Attend from decoder states to encoder states.

        Args:
            query: (batch, tgt_len, query_size) decoder states.
            proj_keys: (batch, src_len, attention_size) from ``project_keys``.
            values: (batch, src_len, key_size) encoder outputs.
            mask: (batch, src_len) bool, True at real source positions.

        Returns:
            context: (batch, tgt_len, key_size) and weights: (batch, tgt_len, src_len).
        """
        proj_query = self.query_layer(query)  # (batch, tgt_len, attention_size)
        energy = self.activation(proj_query.unsqueeze(2) + proj_keys.unsqueeze(1))
        scores = self.energy_layer(energy).squeeze(-1)  # (batch, tgt_len, src_len)
        weights = masked_softmax(scores, mask)
        return torch.bmm(weights.to(values.dtype), values), weights


class LuongAttention(nn.Module):
    """Multiplicative attention: ``dot`` q^T k, or ``general`` q^T W k.

    For ``general`` the matrix W is applied to the keys once per batch, not to each query.
    """

    def __init__(self, query_size: int, key_size: int, method: str = "general") -> None:
        super().__init__()
        if method not in ("dot", "general"):
            raise ValueError(f"Luong attention method must be 'dot' or 'general', got {method!r}")
        if method == "dot" and query_size != key_size:
            raise ValueError(
                f"'dot' attention needs equal query and key sizes, got {query_size} and "
                f"{key_size}; use 'general'"
            )
        self.method = method
        self.key_layer = nn.Linear(key_size, query_size, bias=False) if method == "general" else None

    def project_keys(self, keys: Tensor) -> Tensor:
        """(batch, src_len, key_size) -> (batch, src_len, query_size)."""
        return keys if self.key_layer is None else self.key_layer(keys)

    def forward(self, query: Tensor, proj_keys: Tensor, values: Tensor,
                mask: Tensor) -> tuple[Tensor, Tensor]:
        """Same contract as ``BahdanauAttention.forward``."""
        if query.size(1) == 1:  # a batched product with one row is slow on CPU
            scores = (proj_keys * query).sum(2, keepdim=True).transpose(1, 2)
        else:
            scores = torch.bmm(query, proj_keys.transpose(1, 2))  # (batch, tgt_len, src_len)
        weights = masked_softmax(scores, mask)
        return torch.bmm(weights.to(values.dtype), values), weights


def make_attention(kind: str | None, query_size: int, key_size: int,
                   attention_size: int) -> nn.Module | None:
    """``bahdanau``, ``dot``, ``general`` or None."""
    if kind is None:
        return None
    if kind == "bahdanau":
        return BahdanauAttention(query_size, key_size, attention_size)
    return LuongAttention(query_size, key_size, kind)
