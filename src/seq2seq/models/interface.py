"""The decoding interface: what greedy and beam search (``seq2seq.decoding.search``) call.

A model family implements it with a session class; a session is one decoding call's object
(it may serve many batches of that call), made with the model in eval mode and dropped after
the call. It owns everything a call computes and reuses (tables, caches, buffers), so the
model's modules hold parameters only and threads may share one model. Implementations:

- ``seq2seq.models.rnn.session.RNNSession``: the plain RNN, in plain PyTorch;
- ``seq2seq.kernels.session.FastRNNSession``: the same RNN with the output layer's products
  in bf16 and exact rescoring, on a CPU in bf16; chosen by ``seq2seq.kernels.decoding_session``;
- ``seq2seq.models.transformer.session.TransformerSession``: the Transformer, whose state is
  its key/value cache.

Shapes: ``sentences`` source sentences, ``rows = sentences * beams`` decoder rows (a
sentence's beams adjacent), ``src_len`` source positions, ``vocab`` output scores.
``memory`` and ``state`` are the session's own objects; search only passes them back and
reorders them through the session.
"""

from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor


class DecodingSession(Protocol):
    """One decoding call of a model."""

    rounds_scores: bool
    """True where ``step``'s scores are rounded (bf16 products) and ``exact_logits``
    gives exact ones for a few candidates."""

    # Optional (absent means False): True where ``step``'s scores are already
    # log-probabilities to rank by as they are (``decoding.ensemble``: the weighted mean of its
    # members' log-probabilities, which need not sum to one); the search skips its log-softmax.
    # scores_are_log_probs: bool

    def encode(self, src: Tensor, src_lengths: Tensor) -> tuple[Any, Any]:
        """src: (sentences, src_len) ids or (sentences, src_len, features) vectors;
        src_lengths: (sentences,) each >= 1 -> (memory, state): memory holds each sentence
        once; state has one row per sentence (``reorder_state`` makes beams of it)."""

    def step(self, prev: Tensor, state: Any, memory: Any,
             beams: int = 1) -> tuple[Tensor, Any, Tensor | None]:
        """One decoder step of ``rows`` rows whose sentences are ``memory``'s, ``beams``
        rows each.

        Args:
            prev: (rows, 1) previous token ids, or (rows, 1, features) vectors.

        Returns:
            scores (rows, 1, vocab) unnormalised (the log-softmax is the search's), the new
            state, and the attention weights (rows, 1, src_len) (each row sums to 1 over
            the real positions, 0 on padding) or None for a model without attention.
        """

    def reorder_state(self, state: Any, index: Tensor) -> Any:
        """The state of rows ``index`` ((new_rows,) long into the current rows: each new
        row's origin, e.g. the beam it extends)."""

    def reorder_memory(self, memory: Any, index: Tensor) -> Any:
        """The memory of sentences ``index`` ((new_sentences,) long)."""

    def exact_logits(self, rows: Tensor, tokens: Tensor) -> Tensor | None:
        """Float32 scores of the last step's (row, token) pairs (int tensors of one shape),
        where ``rounds_scores``; else None."""
