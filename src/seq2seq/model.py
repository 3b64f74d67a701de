"""The encoder-decoder model that both faces of the library use.

Sources and targets are either token ids (translation: embeddings in, vocabulary scores out)
or real vectors (the NumPy ``EncoderDecoderRNN``: vectors in, class scores or values out).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from seq2seq.config import ModelConfig
from seq2seq.decoder import Decoder, DecoderState, Memory
from seq2seq.encoder import Encoder
from seq2seq.gru import GRU
from seq2seq.loss import output_cross_entropy, reduced_precision_scores
from seq2seq.ops import FastDropout, cpu_linear


class Seq2Seq(nn.Module):
    """Embeddings (or vector inputs), encoder, decoder with attention, output layer.

    Give ``src_vocab`` for token sources or ``src_features`` for vector sources, and
    ``tgt_vocab`` for token targets or ``tgt_features`` for vector targets.
    """

    def __init__(self, config: ModelConfig, *, src_vocab: int = 0, tgt_vocab: int = 0,
                 src_features: int = 0, tgt_features: int = 0, pad_id: int = 0,
                 vector_feedback: str = "onehot") -> None:
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
        self.encoder = Encoder(config.cell, embed if src_vocab else src_features, hidden,
                               config.encoder_layers, config.bidirectional, config.dropout)
        tie = bool(config.tie_embeddings and tgt_vocab)
        output_size = embed if tie else hidden
        self.decoder = Decoder(
            config.cell, embed if tgt_vocab else tgt_features, hidden, output_size,
            encoder_output_size=self.encoder.output_size,
            encoder_state_size=self.encoder.output_size, num_layers=config.decoder_layers,
            attention=config.attention, attention_size=config.attention_size,
            input_feeding=config.input_feeding, dropout=config.dropout,
        )
        self.embed_dropout = FastDropout(config.dropout)
        self.generator = nn.Linear(output_size, tgt_vocab or tgt_features)
        self._decoding_tables: dict[int, dict] = {}  # by thread; see decoding()
        if tie:
            self.generator.weight = self.tgt_embed.weight

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

    def decode(self, prev: Tensor, state: DecoderState, memory: Memory,
               beams: int = 1) -> tuple[Tensor, DecoderState, Tensor | None]:
        """Scores for the steps after ``prev``: (batch, steps, tgt_vocab or tgt_features).
        ``beams``: see ``Decoder.forward``."""
        table = self._gru_input_table(prev)
        if table is not None:
            outputs, state, weights = self.decoder(None, state, memory, beams,
                                                   input_gates=nn.functional.embedding(prev, table))
        else:
            outputs, state, weights = self.decoder(self.embed_target(prev), state, memory, beams)
        return self._generate(outputs), state, weights

    def _generate(self, outputs: Tensor) -> Tensor:
        """The output layer. Without gradients on CPU its float32 product runs through oneDNN
        (``ops.cpu_linear``). Inside ``decoding(output_dtype=...)`` the product runs in that
        dtype (weights converted once per block), the scores come back float32, and the
        outputs are kept for ``exact_logits``."""
        tables = self._decoding_tables.get(threading.get_ident())
        dtype = None if tables is None else tables["output_dtype"]
        if not isinstance(self.generator, nn.Linear):  # int8: as it is
            return self.generator(outputs)
        if dtype is None:  # cpu_linear is F.linear where a gradient is recorded
            flat = outputs.reshape(-1, outputs.size(-1))
            return cpu_linear(flat, self.generator.weight, self.generator.bias).view(
                *outputs.shape[:-1], -1)
        if "generator" not in tables:
            tables["generator"] = self.generator.weight.detach().to(dtype)
        tables["outputs"] = outputs.reshape(-1, outputs.size(-1))
        return reduced_precision_scores(outputs, tables["generator"], self.generator.bias)

    def rounds_scores(self) -> bool:
        """Whether ``decode`` here (this thread's ``decoding`` block) rounds the output
        layer's scores to a reduced precision, so that ``exact_logits`` has work to do."""
        tables = self._decoding_tables.get(threading.get_ident())
        return (tables is not None and tables["output_dtype"] is not None
                and isinstance(self.generator, nn.Linear))

    def exact_logits(self, rows: Tensor, tokens: Tensor) -> Tensor | None:
        """The float32 scores of chosen (row, token) pairs of the last decoded step, where
        that step's output layer ran in reduced precision (``decoding(output_dtype=...)``);
        else None, since the step's scores are exact already.

        A bf16 product rounds each score to 8 significant bits (about 0.03 on a score of
        10), enough to reorder close candidates; decoding ranks by the rounded scores and
        rescores only its few candidates in float32 (``search``).

        Args:
            rows, tokens: int tensors of one shape: rows of the last step's (rows, vocab)
                scores (``decode`` with one step) and token ids.

        Returns:
            float32 ``outputs[rows] . weight[tokens] + bias[tokens]``, of that shape.
        """
        if not self.rounds_scores():
            return None
        hidden = self._decoding_tables[threading.get_ident()]["outputs"][rows].float()
        logits = (hidden * nn.functional.embedding(tokens, self.generator.weight)).sum(-1)
        if self.generator.bias is not None:
            logits = logits + self.generator.bias[tokens]
        return logits

    @contextlib.contextmanager
    def decoding(self, expected_rows: int = 0,
                 output_dtype: torch.dtype | None = None) -> Iterator[None]:
        """Decode many steps with frozen weights: within, tables computed from the weights
        (the GRU input projection of every target token) are made once and reused, and
        dropped at the end. Do not change the weights inside. Each thread has its own tables,
        so threads may decode with one model at once; an inner block reuses the outer one's.

        Args:
            expected_rows: about how many rows x steps the block will decode (for example
                source tokens x beam), so that a table that pays for itself is made at the
                first step, and one that would not is not made at all.
            output_dtype: the dtype of the output layer's product in ``decode`` (bf16 decoding
                on CPU; see ``loss.reduced_precision_scores``), or None for the model's own.
        """
        thread = threading.get_ident()
        if thread in self._decoding_tables:
            yield
            return
        self._decoding_tables[thread] = {"rows": expected_rows, "output_dtype": output_dtype}
        try:
            yield
        finally:
            del self._decoding_tables[thread]

    def _decodes_by_table(self, prev: Tensor) -> bool:
        """Inside ``decoding()``, a one-layer GRU decoding one token at a time (no gradients,
        no autocast) may read the token's input projection from a table."""
        return (threading.get_ident() in self._decoding_tables and self.tgt_embed is not None
                and isinstance(self.decoder.rnn, GRU)
                and self.decoder.rnn.num_layers == 1 and prev.size(1) == 1
                and not self.training and not torch.is_grad_enabled()
                and not torch.is_autocast_enabled(prev.device.type))

    def _gru_input_table(self, prev: Tensor) -> Tensor | None:
        """The (vocab, 3 * hidden) input-projection table for this decoding step, or None.

        The table costs as much as projecting ``vocab`` rows, so it is made once the rows
        expected (``decoding(expected_rows)``) and decoded reach that: a call that
        translates one sentence does not pay for it."""
        if not self._decodes_by_table(prev):
            return None
        tables = self._decoding_tables[threading.get_ident()]
        if "gru_input" not in tables:
            tables["rows"] += prev.size(0)
            if tables["rows"] < self.tgt_embed.num_embeddings:
                return None
            tables["gru_input"] = self.decoder.rnn.input_table(self.tgt_embed.weight)
        return tables["gru_input"]

    def forward(self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor,
                sampling_ratio: float = 0.0, tgt_out: Tensor | None = None,
                label_smoothing: float = 0.0,
                output_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor | None]:
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
                ``forward(idx, targets)``; the output layer and the loss then run fused).
            label_smoothing: with ``tgt_out``, as in ``nn.CrossEntropyLoss``.
            output_dtype: with ``tgt_out`` (and no scheduled sampling), the dtype of the
                fused output layer's products (``output_cross_entropy``'s ``matmul_dtype``):
                bf16 training on CPU sets it instead of autocasting the whole model.

        Returns:
            scores: (batch, tgt_len, tgt_vocab or tgt_features), or the float32 loss sum.
            weights: (batch, tgt_len, src_len) attention weights, or None.
        """
        if tgt_out is not None and self.tgt_embed is None:
            raise ValueError("tgt_out is for token targets; compute a vector loss from the scores")
        memory, state = self.encode(src, src_lengths)
        if sampling_ratio <= 0.0 and tgt_out is not None:
            outputs, _, weights = self.decoder(self.embed_target(tgt_in), state, memory)
            loss = output_cross_entropy(outputs.reshape(-1, outputs.size(-1)),
                                        self.generator.weight, self.generator.bias,
                                        tgt_out.reshape(-1), self.pad_id, label_smoothing,
                                        output_dtype)
            return loss, weights
        if sampling_ratio <= 0.0:
            scores, _, weights = self.decode(tgt_in, state, memory)
            return scores, weights
        steps, weights_per_step = [], []
        prev = tgt_in[:, :1]
        for t in range(tgt_in.size(1)):
            scores, state, weights = self.decode(prev, state, memory)
            steps.append(scores)
            weights_per_step.append(weights)
            if t + 1 < tgt_in.size(1):
                gold = tgt_in[:, t + 1:t + 2]
                use_model = torch.rand(gold.size(0), device=gold.device) < sampling_ratio
                guess = self.prediction_to_input(scores.detach())
                shape = (-1,) + (1,) * (gold.dim() - 1)
                prev = torch.where(use_model.view(shape), guess, gold)
        weights = None if weights_per_step[0] is None else torch.cat(weights_per_step, 1)
        scores = torch.cat(steps, 1)
        if tgt_out is not None:
            return nn.functional.cross_entropy(
                scores.reshape(-1, scores.size(-1)).float(), tgt_out.reshape(-1),
                ignore_index=self.pad_id, reduction="sum", label_smoothing=label_smoothing), weights
        return scores, weights

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
