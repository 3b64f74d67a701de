"""The Transformer encoder-decoder, read top to bottom: attention, the two layer kinds, the model.

Attention runs on ``torch.nn.functional.scaled_dot_product_attention`` with explicit masks: a
padding mask on the source keys (``(batch, 1, 1, src_len)``, True at real positions) and the
causal mask of the decoder's self-attention. ``norm: pre`` puts a layer norm before each block
and one after the last layer (as JoeyNMT and fairseq's ``normalize_before``); ``post`` puts it
after each residual sum (the original paper).

``Transformer`` holds parameters only. Decoding one step at a time (``session.TransformerSession``)
keeps each layer's keys and values in the session, never in the modules: the layers take the
cache in and give it back, as Hugging Face's ``past_key_values``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from seq2seq.config import ModelConfig
from seq2seq.models.rnn.model import OutputLoss

KeyValue = tuple[Tensor, Tensor]  # keys and values, each (batch, heads, length, head_size)


class Attention(nn.Module):
    """Multi-head attention: projections, then ``scaled_dot_product_attention``."""

    def __init__(self, d_model: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.query = nn.Linear(d_model, d_model)
        self.key_value = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def split(self, x: Tensor) -> Tensor:
        """(batch, length, d_model) -> (batch, heads, length, head_size)."""
        batch, length, d_model = x.shape
        return x.view(batch, length, self.heads, d_model // self.heads).transpose(1, 2)

    def keys_values(self, x: Tensor) -> KeyValue:
        """(batch, length, d_model) -> keys and values, each (batch, heads, length, head_size)."""
        keys, values = self.key_value(x).chunk(2, dim=-1)
        return self.split(keys), self.split(values)

    def forward(self, x: Tensor, kv: KeyValue, mask: Tensor | None = None, causal: bool = False,
                groups: int = 1) -> Tensor:
        """Queries from x (batch * groups, q_len, d_model) attend to ``kv`` of ``batch`` rows
        ((batch, heads, k_len, head_size) each): the ``groups`` query rows of one kv row (a
        sentence's beams) read the same keys. ``mask``: bool, broadcastable to (batch, heads,
        groups * q_len, k_len), True where attention may go. -> (batch * groups, q_len, d_model)."""
        rows, q_len, d_model = x.shape
        q = self.split(self.query(x))  # (rows, heads, q_len, head_size)
        if groups > 1:  # (batch, heads, groups * q_len, head_size): one kv row per group
            q = q.reshape(rows // groups, groups, self.heads, q_len, -1).transpose(1, 2)
            q = q.reshape(rows // groups, self.heads, groups * q_len, -1)
        y = F.scaled_dot_product_attention(q, *kv, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        if groups > 1:
            y = y.reshape(rows // groups, self.heads, groups, q_len, -1).transpose(1, 2)
        y = y.reshape(rows, self.heads, q_len, -1).transpose(1, 2).reshape(rows, q_len, d_model)
        return self.out(y)

    def weights(self, x: Tensor, keys: Tensor, mask: Tensor, groups: int = 1) -> Tensor:
        """The attention weights of ``forward`` (without dropout), for looking at: (batch *
        groups, heads, q_len, k_len), 0 where ``mask`` is False. SDPA does not return them."""
        q = self.split(self.query(x))
        keys = keys.repeat_interleave(groups, 0) if groups > 1 else keys
        mask = mask.repeat_interleave(groups, 0) if groups > 1 else mask
        scores = q @ keys.transpose(-2, -1) / math.sqrt(q.size(-1))
        return scores.masked_fill(~mask, float("-inf")).softmax(-1)


class FeedForward(nn.Sequential):
    """(..., d_model) -> (..., d_model) through a ReLU layer of ``ff_size``."""

    def __init__(self, d_model: int, ff_size: int, dropout: float) -> None:
        super().__init__(nn.Linear(d_model, ff_size), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(ff_size, d_model))


class Layer(nn.Module):
    """The residual blocks' common part: dropout on each block's output, and the layer norms
    placed before (``pre``) or after (``post``) each residual sum."""

    def __init__(self, config: ModelConfig, blocks: int) -> None:
        super().__init__()
        self.pre_norm = config.norm == "pre"
        self.norms = nn.ModuleList(nn.LayerNorm(config.d_model) for _ in range(blocks))
        self.dropout = nn.Dropout(config.dropout)
        self.feed_forward = FeedForward(config.d_model, config.ff_size, config.dropout)

    def residual(self, x: Tensor, block: int, fn) -> Tensor:
        """x + fn(x), normed as ``norm`` says; ``block`` picks the layer norm."""
        norm = self.norms[block]
        if self.pre_norm:
            return x + self.dropout(fn(norm(x)))
        return norm(x + self.dropout(fn(x)))


class EncoderLayer(Layer):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config, blocks=2)
        self.attention = Attention(config.d_model, config.heads, config.attention_dropout)

    def forward(self, x: Tensor, src_mask: Tensor) -> Tensor:
        """x: (batch, src_len, d_model); src_mask: (batch, 1, 1, src_len) -> x's shape."""
        x = self.residual(x, 0, lambda h: self.attention(h, self.attention.keys_values(h), src_mask))
        return self.residual(x, 1, self.feed_forward)


class DecoderLayer(Layer):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config, blocks=3)
        self.self_attention = Attention(config.d_model, config.heads, config.attention_dropout)
        self.cross_attention = Attention(config.d_model, config.heads, config.attention_dropout)

    def forward(self, x: Tensor, cross_kv: KeyValue, src_mask: Tensor, cache: KeyValue | None = None,
                beams: int = 1, with_weights: bool = False) -> tuple[Tensor, KeyValue, Tensor | None]:
        """x: (rows, steps, d_model), the target positions after ``cache``'s.

        Args:
            cross_kv: this layer's keys and values of the encoder output, (sentences, heads,
                src_len, head_size) each, ``rows = sentences * beams``.
            src_mask: (sentences, 1, 1, src_len).
            cache: the self-attention keys and values of the earlier positions, (rows, heads,
                earlier, head_size) each, or None (no earlier position: causal over x).
            with_weights: also compute the cross-attention weights.

        Returns:
            x's shape; the keys and values of all positions so far (the new cache); the
            cross-attention weights (rows, heads, steps, src_len), or None.
        """
        kv: KeyValue = (x, x)  # replaced by attend_self
        weights = None

        def attend_self(h: Tensor) -> Tensor:
            nonlocal kv
            kv = self.self_attention.keys_values(h)
            if cache is not None:
                kv = (torch.cat([cache[0], kv[0]], 2), torch.cat([cache[1], kv[1]], 2))
            # each position sees itself and the earlier ones: causal within x, all of cache
            return self.self_attention(h, kv, causal=cache is None and h.size(1) > 1)

        def attend_source(h: Tensor) -> Tensor:
            nonlocal weights
            if with_weights:
                weights = self.cross_attention.weights(h, cross_kv[0], src_mask, beams)
            return self.cross_attention(h, cross_kv, src_mask, groups=beams)

        x = self.residual(x, 0, attend_self)
        x = self.residual(x, 1, attend_source)
        return self.residual(x, 2, self.feed_forward), kv, weights


def sinusoids(positions: Tensor, size: int) -> Tensor:
    """(...) positions -> (..., size) sin and cos of geometric wavelengths (Vaswani et al.)."""
    rates = torch.exp(torch.arange(0, size, 2, device=positions.device) * (-math.log(10000.0) / size))
    angles = positions.unsqueeze(-1).float() * rates
    return torch.stack([angles.sin(), angles.cos()], -1).flatten(-2)[..., :size]


class Transformer(nn.Module):
    """Embeddings with positions, encoder layers, decoder layers, output layer.

    ``forward`` has ``Seq2Seq``'s contract (training and validation call both alike);
    ``encode``, ``cross_keys_values`` and ``decode`` are the pieces a decoding session calls.
    """

    autocasts_on_cpu = True  # train.precision bf16 autocasts it on a CPU too (ops.precision_autocast)

    def __init__(self, config: ModelConfig, *, src_vocab: int, tgt_vocab: int, pad_id: int = 0) -> None:
        super().__init__()
        config.validate()
        self.config, self.pad_id, d_model = config, pad_id, config.d_model
        self.src_embed = nn.Embedding(src_vocab, d_model, padding_idx=pad_id)
        self.tgt_embed = (self.src_embed if config.share_embeddings
                          else nn.Embedding(tgt_vocab, d_model, padding_idx=pad_id))
        self.positions = (nn.Embedding(config.max_positions, d_model)
                          if config.positions == "learned" else None)
        self.embed_dropout = nn.Dropout(config.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(config) for _ in range(config.encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(config) for _ in range(config.decoder_layers))
        final = config.norm == "pre"  # pre-norm leaves the residual stream unnormed: norm it once
        self.encoder_norm = nn.LayerNorm(d_model) if final else nn.Identity()
        self.decoder_norm = nn.LayerNorm(d_model) if final else nn.Identity()
        self.generator = nn.Linear(d_model, tgt_vocab)
        self.loss = OutputLoss(pad_id)
        for embed in dict.fromkeys([self.src_embed, self.tgt_embed]):  # the scale tying wants
            nn.init.normal_(embed.weight, std=d_model ** -0.5)
            nn.init.zeros_(embed.weight[pad_id])
        if config.tie_embeddings:
            self.generator.weight = self.tgt_embed.weight

    def embed(self, table: nn.Embedding, ids: Tensor, start: int = 0) -> Tensor:
        """(batch, length) ids at positions start, start + 1, ... -> (batch, length, d_model)."""
        positions = torch.arange(start, start + ids.size(1), device=ids.device)
        if self.positions is None:
            where = sinusoids(positions, self.config.d_model)
        elif start + ids.size(1) > self.config.max_positions:
            raise ValueError(f"position {start + ids.size(1) - 1} is past model.max_positions "
                             f"({self.config.max_positions}) of learned positions")
        else:
            where = self.positions(positions)
        return self.embed_dropout(table(ids) * math.sqrt(self.config.d_model) + where)

    def encode(self, src: Tensor, src_lengths: Tensor) -> tuple[Tensor, Tensor]:
        """src: (batch, src_len) ids; src_lengths: (batch,) each >= 1 -> encoder output
        (batch, src_len, d_model) and the source mask (batch, 1, 1, src_len), True at real
        positions."""
        positions = torch.arange(src.size(1), device=src.device)
        mask = (positions < src_lengths.to(src.device).unsqueeze(1))[:, None, None, :]
        x = self.embed(self.src_embed, src)
        for layer in self.encoder:
            x = layer(x, mask)
        return self.encoder_norm(x), mask

    def cross_keys_values(self, encoded: Tensor) -> list[KeyValue]:
        """Each decoder layer's keys and values of the encoder output (batch, src_len, d_model)."""
        return [layer.cross_attention.keys_values(encoded) for layer in self.decoder]

    def decode(self, tgt: Tensor, cross_kv: list[KeyValue], src_mask: Tensor,
               cache: list[KeyValue] | None = None, beams: int = 1,
               weights_of: int | None = None) -> tuple[Tensor, list[KeyValue], Tensor | None]:
        """tgt: (rows, steps) ids after the ``cache``'s positions (None: from the start) -> the
        last layer's normed outputs (rows, steps, d_model), each layer's new cache, and the
        cross-attention weights (rows, heads, steps, src_len) of layer ``weights_of`` (or None).
        ``rows = sentences * beams``, where ``cross_kv`` and ``src_mask`` have sentences."""
        start = 0 if cache is None else cache[0][0].size(2)
        x = self.embed(self.tgt_embed, tgt, start)
        new_cache, weights = [], None
        for i, layer in enumerate(self.decoder):
            x, kv, found = layer(x, cross_kv[i], src_mask, None if cache is None else cache[i], beams,
                                 with_weights=i == weights_of)
            new_cache.append(kv)
            weights = found if found is not None else weights
        return self.decoder_norm(x), new_cache, weights

    def forward(self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor, sampling_ratio: float = 0.0,
                tgt_out: Tensor | None = None, label_smoothing: float = 0.0) -> tuple[Tensor, None]:
        """Teacher-forced scores for every target step, or (given ``tgt_out``) their summed
        label-smoothed cross-entropy, as ``Seq2Seq.forward``.

        Args:
            src: (batch, src_len) ids; src_lengths: (batch,).
            tgt_in: (batch, tgt_len) ids starting with bos.
            sampling_ratio: must be 0 (scheduled sampling is the RNN's).
            tgt_out: (batch, tgt_len) ids to predict, pad where nothing is.

        Returns:
            scores (batch, tgt_len, tgt_vocab) or the float32 loss sum; and None (the
            attention weights are the decoding session's, computed when looked at).
        """
        if sampling_ratio:
            raise ValueError("scheduled sampling (train.sampling_ratio) is for model.arch=rnn")
        encoded, mask = self.encode(src, src_lengths)
        outputs, _, _ = self.decode(tgt_in, self.cross_keys_values(encoded), mask)
        if tgt_out is None:
            return self.generator(outputs), None
        return self.loss(outputs, self.generator, tgt_out, label_smoothing), None

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self, src_tokens: int, tgt_tokens: int, pairs: int) -> float:
        """Forward-pass FLOPs of the matrix products for a padded batch (``Seq2Seq.estimate_flops``'s
        contract: ``pairs`` is the sum of tgt_len * src_len; self-attention's pairs follow from it).
        A multiply-add counts 2."""
        d, ff, vocab = self.config.d_model, self.config.ff_size, self.generator.out_features
        src_self = pairs * src_tokens / max(tgt_tokens, 1)  # sum of src_len ** 2
        tgt_self = pairs * tgt_tokens / max(src_tokens, 1)
        encoder = src_tokens * (8 * d * d + 4 * d * ff) + 4 * d * src_self
        decoder = (tgt_tokens * (12 * d * d + 4 * d * ff) + src_tokens * 4 * d * d
                   + 4 * d * (tgt_self + pairs))
        return (len(self.encoder) * encoder + len(self.decoder) * decoder
                + 2 * tgt_tokens * d * vocab)
