"""The encoder-decoder model that both faces of the library use.

Sources and targets are either token ids (translation: embeddings in, vocabulary scores out)
or real vectors (the NumPy ``EncoderDecoderRNN``: vectors in, class scores or values out).
``Seq2Seq`` holds parameters only, in plain PyTorch; what a decoding call computes and reuses
lives in that call's session (``session.RNNSession``), so threads and a server's requests can
share one model. Fused twins of its modules are applied from outside (``seq2seq.kernels.apply``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from seq2seq.config import ModelConfig
from seq2seq.models.rnn.decoder import Decoder, DecoderState, Memory
from seq2seq.models.rnn.encoder import Encoder


class Seq2Seq(nn.Module):
    """Embeddings (or vector inputs), encoder, decoder with attention, output layer.

    Give ``src_vocab`` for token sources or ``src_features`` for vector sources, and
    ``tgt_vocab`` for token targets or ``tgt_features`` for vector targets. It is built with
    plain PyTorch modules only; ``seq2seq.kernels.apply`` swaps in fused twins.
    """

    def __init__(self, config: ModelConfig, *, src_vocab: int = 0, tgt_vocab: int = 0,
                 src_features: int = 0, tgt_features: int = 0, pad_id: int = 0,
                 vector_feedback: str = "onehot", rnn_init: str = "pytorch") -> None:
        super().__init__()
        if (src_vocab > 0) == (src_features > 0) or (tgt_vocab > 0) == (tgt_features > 0):
            raise ValueError("give exactly one of src_vocab/src_features and of "
                             "tgt_vocab/tgt_features")
        config.validate()
        self.config = config
        self.pad_id = pad_id
        if vector_feedback not in ("onehot", "identity"):
            raise ValueError(f"vector_feedback must be 'onehot' or 'identity', got {vector_feedback!r}")
        self.vector_feedback = vector_feedback
        self.tgt_vocab = tgt_vocab
        hidden, embed = config.hidden_size, config.embed_size

        self.src_embed = nn.Embedding(src_vocab, embed, padding_idx=pad_id) if src_vocab else None
        self.tgt_embed = nn.Embedding(tgt_vocab, embed, padding_idx=pad_id) if tgt_vocab else None
        self.encoder = Encoder(config.cell, embed if src_vocab else src_features,
                               config.encoder_hidden_size or hidden, config.encoder_layers,
                               config.bidirectional, config.dropout)
        tie = bool(config.tie_embeddings and tgt_vocab)
        output_size = embed if tie else hidden
        self.decoder = Decoder(
            config.cell, embed if tgt_vocab else tgt_features, hidden, output_size,
            encoder_output_size=self.encoder.output_size,
            encoder_state_size=self.encoder.output_size, num_layers=config.decoder_layers,
            attention=config.attention, attention_size=config.attention_size,
            input_feeding=config.input_feeding, dropout=config.dropout,
        )
        self.embed_dropout = nn.Dropout(config.dropout)
        self.generator = nn.Linear(output_size, tgt_vocab or tgt_features)
        self.loss = OutputLoss(pad_id)
        if tie:
            self.generator.weight = self.tgt_embed.weight
        if rnn_init not in ("pytorch", "orthogonal"):
            raise ValueError(f"rnn_init must be 'pytorch' or 'orthogonal', got {rnn_init!r}")
        if rnn_init == "orthogonal":  # for vector inputs: see orthogonal_init
            for rnn in (self.encoder.rnn, self.decoder.rnn):
                orthogonal_init(rnn)

    # -- encoder side -------------------------------------------------------------------
    def encode(self, src: Tensor, src_lengths: Tensor) -> tuple[Memory, DecoderState]:
        """Encode a batch and prepare the decoder.

        Args:
            src: (batch, src_len) token ids, or (batch, src_len, src_features) vectors.
            src_lengths: (batch,) real lengths, each >= 1.

        Returns:
            memory for attention and the decoder's initial state.
        """
        inputs = self.src_embed(src) if self.src_embed is not None else src
        outputs, final = self.encoder(inputs, src_lengths)
        positions = torch.arange(src.size(1), device=src.device)
        mask = positions.unsqueeze(0) < src_lengths.to(src.device).unsqueeze(1)  # (batch, src_len)
        return self.decoder.prepare(outputs, mask), self.decoder.init_state(final)

    # -- decoder side -------------------------------------------------------------------
    def embed_target(self, prev: Tensor) -> Tensor:
        """(batch, steps) ids or (batch, steps, tgt_features) vectors -> decoder inputs."""
        return self.embed_dropout(self.tgt_embed(prev) if self.tgt_embed is not None else prev)

    def decode(self, prev: Tensor, state: DecoderState,
               memory: Memory) -> tuple[Tensor, DecoderState, Tensor | None]:
        """Scores for the steps after ``prev``: (batch, steps, tgt_vocab or tgt_features),
        the state after them and the attention weights (``Decoder.forward``)."""
        outputs, state, weights = self.decoder(self.embed_target(prev), state, memory)
        return self.generator(outputs), state, weights

    def forward(self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor,
                sampling_ratio: float = 0.0, tgt_out: Tensor | None = None,
                label_smoothing: float = 0.0) -> tuple[Tensor, Tensor | None]:
        """Teacher-forced scores for every target step, or (given ``tgt_out``) their loss.

        Args:
            src: (batch, src_len) ids or (batch, src_len, src_features) vectors.
            src_lengths: (batch,).
            tgt_in: decoder inputs, the target shifted right: (batch, tgt_len) ids starting
                with bos, or (batch, tgt_len, tgt_features) vectors starting with zeros.
            sampling_ratio: scheduled sampling; at each step after the first, each sequence
                is fed the model's own previous prediction with this probability.
            tgt_out: (batch, tgt_len) token ids to predict (pad where nothing is), for
                token targets only. Given, the first result is their summed
                label-smoothed cross-entropy instead of the scores (as nanoGPT's
                ``forward(idx, targets)``), computed by ``self.loss`` from the output
                layer's inputs.
            label_smoothing: with ``tgt_out``, as in ``nn.CrossEntropyLoss``.

        Returns:
            scores: (batch, tgt_len, tgt_vocab or tgt_features), or the float32 loss sum.
            weights: (batch, tgt_len, src_len) attention weights, or None.
        """
        if tgt_out is not None and self.tgt_embed is None:
            raise ValueError("tgt_out is for token targets; compute a vector loss from the scores")
        memory, state = self.encode(src, src_lengths)
        if sampling_ratio > 0.0:
            scores, weights = self._sample(tgt_in, state, memory, sampling_ratio)
            if tgt_out is None:
                return scores, weights
            return cross_entropy(scores, tgt_out, self.pad_id, label_smoothing), weights
        outputs, _, weights = self.decoder(self.embed_target(tgt_in), state, memory)
        if tgt_out is None:
            return self.generator(outputs), weights
        return self.loss(outputs, self.generator, tgt_out, label_smoothing), weights

    def _sample(self, tgt_in: Tensor, state: DecoderState, memory: Memory,
                ratio: float) -> tuple[Tensor, Tensor | None]:
        """``forward``'s scores and weights, each step fed the model's own previous prediction
        with probability ``ratio``."""
        steps, weights_per_step = [], []
        prev = tgt_in[:, :1]
        for t in range(tgt_in.size(1)):
            scores, state, weights = self.decode(prev, state, memory)
            steps.append(scores)
            weights_per_step.append(weights)
            if t + 1 < tgt_in.size(1):
                gold = tgt_in[:, t + 1:t + 2]
                use_model = torch.rand(gold.size(0), device=gold.device) < ratio
                guess = self.prediction_to_input(scores.detach())
                shape = (-1,) + (1,) * (gold.dim() - 1)
                prev = torch.where(use_model.view(shape), guess, gold)
        weights = None if weights_per_step[0] is None else torch.cat(weights_per_step, 1)
        return torch.cat(steps, 1), weights

    def prediction_to_input(self, scores: Tensor) -> Tensor:
        """What the next step is fed after a prediction: the argmax id for tokens; for vectors
        the one-hot argmax (``vector_feedback='onehot'``, class scores) or the prediction
        itself (``'identity'``, real values)."""
        if self.tgt_embed is not None:
            return scores.argmax(-1)
        if self.vector_feedback == "onehot":
            return nn.functional.one_hot(scores.argmax(-1), scores.size(-1)).to(scores.dtype)
        return scores

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self, src_tokens: int, tgt_tokens: int, pairs: int) -> float:
        """Forward-pass FLOPs of the matrix products for a batch, counted analytically.

        Args:
            src_tokens, tgt_tokens: source and target positions (padding included if run).
            pairs: attention (target step, source position) pairs, sum of tgt_len * src_len.

        A multiply-add counts 2. Training (forward + backward) costs about 3 times this.
        """
        gates = {"rnn": 1, "gru": 3, "lstm": 4}[self.config.cell]
        flops = 0.0
        for rnn, tokens in ((self.encoder.rnn, src_tokens), (self.decoder.rnn, tgt_tokens)):
            directions = 2 if rnn.bidirectional else 1
            for layer in range(rnn.num_layers):
                inputs = rnn.input_size if layer == 0 else rnn.hidden_size * directions
                flops += 2 * tokens * directions * gates * rnn.hidden_size * (inputs + rnn.hidden_size)
        decoder, keys = self.decoder, self.encoder.output_size
        attention = decoder.attention
        if attention is not None:
            key_proj = getattr(attention, "key_layer", None)
            if key_proj is not None:
                flops += 2 * src_tokens * key_proj.in_features * key_proj.out_features
            if hasattr(attention, "query_layer"):  # Bahdanau: query projection, energy
                size = attention.query_layer.out_features
                flops += 2 * tgt_tokens * decoder.hidden_size * size + 2 * pairs * size
            else:  # Luong: one dot product per pair
                flops += 2 * pairs * decoder.hidden_size
            flops += 2 * pairs * keys  # context = weights @ values
        flops += 2 * tgt_tokens * decoder.combine.in_features * decoder.combine.out_features
        flops += 2 * tgt_tokens * self.generator.in_features * self.generator.out_features
        return flops


def cross_entropy(scores: Tensor, targets: Tensor, pad_id: int, label_smoothing: float) -> Tensor:
    """Summed label-smoothed cross-entropy of (..., vocab) ``scores`` against (...) ``targets``
    (``pad_id`` adds nothing), in float32 at least."""
    flat = scores.reshape(-1, scores.size(-1))
    return F.cross_entropy(flat.to(torch.promote_types(flat.dtype, torch.float32)),
                           targets.reshape(-1), ignore_index=pad_id, reduction="sum",
                           label_smoothing=label_smoothing)


class OutputLoss(nn.Module):
    """The training loss: the output layer, then ``cross_entropy``. A module of its own (no
    parameters) so that a fused twin can compute both in one pass
    (``seq2seq.kernels.loss.FusedOutputLoss``)."""

    def __init__(self, pad_id: int) -> None:
        super().__init__()
        self.pad_id = pad_id

    def forward(self, outputs: Tensor, generator: nn.Module, targets: Tensor,
                label_smoothing: float = 0.0) -> Tensor:
        """outputs: (batch, tgt_len, output_size), targets: (batch, tgt_len) -> the float32
        loss sum."""
        return cross_entropy(generator(outputs), targets, self.pad_id, label_smoothing)


def orthogonal_init(rnn: nn.RNNBase) -> None:
    """Initialisation for vector inputs (``rnn_init='orthogonal'``; measured on the seed example
    in benchmarks/seed_example.py: it learns in fewer epochs).

    PyTorch draws every RNN weight from U(+-1/sqrt(hidden)), whatever the input size, so one
    real-valued feature reaches the state at a scale of 0.07 for hidden 200. The first layer's
    input weights are drawn by their fan-in instead (LeCun: U(+-sqrt(3/fan_in))), and each
    gate's recurrent matrix is orthogonal, so the state keeps what it read early on.
    """
    with torch.no_grad():
        for name, weight in rnn.named_parameters():
            if name.startswith("weight_hh"):
                for block in weight.split(rnn.hidden_size):
                    nn.init.orthogonal_(block)
            elif name.startswith("weight_ih_l0"):
                bound = (3.0 / weight.size(1)) ** 0.5
                weight.uniform_(-bound, bound)
