"""The Transformer's decoding session (``models/interface.py``): its state is the key/value cache.

``encode`` runs the encoder once and computes every decoder layer's cross-attention keys and
values (the memory, one row per sentence). Each ``step`` feeds one token per row through the
decoder layers, which append that position's self-attention keys and values to the cache they
are given and return it; ``reorder_state`` picks the cache's rows for the beams. The session
is the only holder of the cache: the modules keep parameters only.

The attention weights shown for a hypothesis (``seq2seq attention``, the page's heatmap, the
API's ``attention`` field) are the cross-attention of one decoder layer (``attention_layer``,
default the last), averaged over its heads or of one head (``attention_head``). SDPA does not
return weights, so that layer's are computed beside it, for the one step's queries.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from seq2seq.models.transformer.model import KeyValue, Transformer


@dataclass
class Memory:
    """cross_kv: each decoder layer's keys and values of the encoder output, (sentences, heads,
    src_len, head_size) each; mask: (sentences, 1, 1, src_len), True at real positions."""

    cross_kv: list[KeyValue]
    mask: Tensor

    def select(self, index: Tensor) -> Memory:
        return Memory([(k.index_select(0, index), v.index_select(0, index)) for k, v in self.cross_kv],
                      self.mask.index_select(0, index))


@dataclass
class Cache:
    """Each decoder layer's self-attention keys and values of the positions decoded so far,
    (rows, heads, steps, head_size) each; None before the first step."""

    layers: list[KeyValue] | None = None

    def select(self, index: Tensor) -> Cache:
        if self.layers is None:
            return Cache(None)
        return Cache([(k.index_select(0, index), v.index_select(0, index)) for k, v in self.layers])


class TransformerSession:
    """One decoding call of a ``Transformer``: see ``models.interface.DecodingSession``."""

    rounds_scores = False

    def __init__(self, model: Transformer, attention_layer: int = -1,
                 attention_head: int | None = None) -> None:
        if model.training:  # dropout would apply to some steps and not to others
            raise ValueError("decode with the model in eval mode (model.eval())")
        layers, heads = len(model.decoder), model.config.heads
        if not -layers <= attention_layer < layers:
            raise ValueError(f"attention_layer must be in [{-layers}, {layers}), got {attention_layer}")
        if attention_head is not None and not 0 <= attention_head < heads:
            raise ValueError(f"attention_head must be one of the {heads} heads, 0 to {heads - 1}, "
                             f"or their mean, got {attention_head}")
        self.model, self.layer, self.head = model, attention_layer % layers, attention_head

    def encode(self, src: Tensor, src_lengths: Tensor) -> tuple[Memory, Cache]:
        """(sentences, src_len) ids, (sentences,) lengths -> the memory and an empty cache."""
        encoded, mask = self.model.encode(src, src_lengths)
        return Memory(self.model.cross_keys_values(encoded), mask), Cache()

    def step(self, prev: Tensor, state: Cache, memory: Memory,
             beams: int = 1) -> tuple[Tensor, Cache, Tensor]:
        """(rows, 1) ids -> (rows, 1, tgt_vocab) scores, the cache with this position, and the
        chosen layer's cross-attention (rows, 1, src_len)."""
        outputs, layers, weights = self.model.decode(prev, memory.cross_kv, memory.mask, state.layers,
                                                     beams, weights_of=self.layer)
        weights = weights.mean(1) if self.head is None else weights[:, self.head]
        return self.model.generator(outputs), Cache(layers), weights

    def reorder_state(self, state: Cache, index: Tensor) -> Cache:
        return state.select(index)

    def reorder_memory(self, memory: Memory, index: Tensor) -> Memory:
        return memory.select(index)

    def exact_logits(self, rows: Tensor, tokens: Tensor) -> Tensor | None:
        return None
