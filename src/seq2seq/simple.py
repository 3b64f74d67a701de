"""``EncoderDecoderRNN``: the NumPy-friendly face of the library.

Users give and get NumPy arrays; inside, one ``Seq2Seq`` model core reads real vectors and
writes class scores (``loss='cross_entropy'``) or real values (``loss='mse'``)::

    rnn = EncoderDecoderRNN(1, 200, 50, apply_softmax=True, loss="cross_entropy")
    rnn.train(X, Y, epochs=500, learning_rate=1e-4)   # X (n, T), Y (n, T_out, 50, 1)
    y = rnn.predict(x)                                  # T_out column vectors (50, 1)

Shapes accepted for a batch ``X``: ``(n, T)`` when ``input_size == 1``, ``(n, T, input_size)``,
``(n, T, input_size, 1)`` (column vectors), or a list of sequences of different lengths.
Targets ``Y``: ``(n, T_out, output_size)``, ``(n, T_out, output_size, 1)``, or integer classes
``(n, T_out)`` with cross-entropy. Output and input lengths may differ.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from seq2seq.checkpoint import atomic_write_bytes, atomic_write_json, check_shapes, shapes_only
from seq2seq.config import CELLS, ModelConfig, normalize_attention
from seq2seq.model import Seq2Seq

LOSSES = ("mse", "cross_entropy")
OPTIMIZERS = ("adam", "sgd")
SETTINGS_FILE = "settings.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "seq2seq.EncoderDecoderRNN"
SETTINGS_KEYS = ("format", "input_size", "hidden_size", "output_size", "apply_softmax", "loss", "cell",
                 "attention", "num_layers", "bidirectional", "dropout", "seed", "target_length")
# A model this small runs fastest on one thread: more only add synchronisation per time step
# (measured on the seed example: see benchmarks/seed_example.py).
SMALL_MODEL_THREADS = 1
SMALL_MODEL_HIDDEN = 256
PREDICT_CHUNK = 1024  # sequences per decoding batch in predict_batch


class EncoderDecoderRNN:
    """An RNN encoder-decoder (optionally with attention) trained on NumPy arrays.

    Args:
        input_size: features per input step.
        hidden_size: the RNN state size (per direction in the encoder).
        output_size: classes (cross-entropy) or values (mse) per output step.
        apply_softmax: ``predict`` returns probabilities (softmax of the scores). With
            ``loss='mse'`` the softmax is also part of the trained output.
        loss: ``'mse'`` (summed squared error over features, mean over steps and batch) or
            ``'cross_entropy'`` (the model outputs logits; the mean cross-entropy of their
            softmax against one-hot, soft or integer class targets).
        cell: ``'rnn'`` (tanh, the default: on the seed example it learns in a fraction of the
            updates a GRU needs, at a third of the cost per update), ``'gru'`` or ``'lstm'``.
        attention: None, ``'bahdanau'`` or ``'luong'`` (also ``'dot'``, ``'general'``).
        num_layers: stacked RNN layers in the encoder and in the decoder.
        bidirectional: a bidirectional encoder.
        dropout: dropout on inputs, between layers and before the output layer.
        seed: makes initialisation, shuffling and dropout repeat exactly run to run (on CPU),
            without touching the global random state. None uses the global torch generator.
        device: ``'auto'`` (cuda if available, else cpu), ``'cpu'``, ``'cuda'``, ``'cuda:N'``.
    """

    def __init__(self, input_size: int, hidden_size: int, output_size: int,
                 apply_softmax: bool = False, loss: str = "mse", *, cell: str = "rnn",
                 attention: str | None = None, num_layers: int = 1, bidirectional: bool = False,
                 dropout: float = 0.0, seed: int | None = None, device: str = "auto") -> None:
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size),
                            ("output_size", output_size), ("num_layers", num_layers)):
            _check_positive_int(name, value)
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}: expected 'mse' or 'cross_entropy'")
        if cell not in CELLS:
            raise ValueError(f"unknown cell {cell!r}: expected one of {', '.join(map(repr, CELLS))}")
        if attention is not None and not isinstance(attention, str):
            raise ValueError(f"attention must be None or a name, got {attention!r}")
        normalize_attention(attention)  # raises ValueError naming the choices
        if not isinstance(dropout, int | float) or isinstance(dropout, bool) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        for name, flag in (("apply_softmax", apply_softmax), ("bidirectional", bidirectional)):
            if not isinstance(flag, bool | np.bool_):
                raise ValueError(f"{name} must be True or False, got {flag!r}")
        if seed is not None and (not isinstance(seed, int | np.integer) or isinstance(seed, bool)
                                 or seed < 0):
            raise ValueError(f"seed must be None or a non-negative integer, got {seed!r}")
        self.input_size = int(input_size)
        self.hidden_size = int(hidden_size)
        self.output_size = int(output_size)
        self.apply_softmax = bool(apply_softmax)
        self.loss = loss
        self.cell = cell
        self.attention = attention
        self.num_layers = int(num_layers)
        self.bidirectional = bool(bidirectional)
        self.dropout = float(dropout)
        self.seed = None if seed is None else int(seed)
        self.device = _pick_device(device)
        self.target_length: int | None = None  # the output length seen in training
        self._rng = None if seed is None else np.random.default_rng(self.seed)

        config = ModelConfig(
            cell=cell, embed_size=hidden_size, hidden_size=hidden_size, encoder_layers=num_layers,
            decoder_layers=num_layers, bidirectional=self.bidirectional, attention=attention,
            # Input feeding would force the decoder to run step by step in training; without
            # it the teacher-forced target goes through the fused RNN in one call.
            input_feeding=False, dropout=self.dropout, tie_embeddings=False,
        )
        with self._random_scope(self.seed):  # initialise on CPU: same weights on any device
            self.model = Seq2Seq(
                config, src_features=self.input_size, tgt_features=self.output_size,
                vector_feedback="onehot" if loss == "cross_entropy" else "identity",
            )
            for rnn in (self.model.encoder.rnn, self.model.decoder.rnn):
                _initialise_rnn(rnn)
        self.model.to(self.device)

    # -- training -----------------------------------------------------------------------
    def train(self, X: Any, Y: Any, epochs: int, learning_rate: float, decay_rate: float = 0.0,
              periodic_callback: Callable[[], Any] | None = None, *, batch_size: int = 64,
              optimizer: str = "adam", callback_every: int = 10,
              verbose: bool = True) -> list[float]:
        """Train with teacher forcing; the learning rate of epoch ``e`` (from 0) is
        ``learning_rate / (1 + decay_rate * e)``.

        Args:
            X: n input sequences (see the module docstring for the shapes).
            Y: n target sequences, all of one length T_out: ``(n, T_out, output_size)``,
                ``(n, T_out, output_size, 1)``, or integer classes ``(n, T_out)`` with
                cross-entropy.
            epochs: passes over the data.
            learning_rate: the optimizer's step size.
            decay_rate: the learning-rate decay per epoch.
            periodic_callback: called with no arguments before training and after every
                ``callback_every`` epochs.
            batch_size: sequences per update. The default, 64, trains the seed example (50
                sequences, hidden 200) fastest of those measured: each epoch costs about 40%
                less than with 10, and all 50 sequences are right after 125 to 150 of its 500
                epochs (100 to 150 with 10 or 32).
            optimizer: ``'adam'`` or ``'sgd'``.
            verbose: a progress bar with the loss on stderr.

        Returns:
            the mean training loss of each epoch.
        """
        _check_positive_int("epochs", epochs)
        _check_positive_int("batch_size", batch_size)
        _check_positive_int("callback_every", callback_every)
        if not _is_number(learning_rate) or not learning_rate > 0 or not math.isfinite(learning_rate):
            raise ValueError(f"learning_rate must be a positive number, got {learning_rate!r}")
        if not _is_number(decay_rate) or not decay_rate >= 0 or not math.isfinite(decay_rate):
            raise ValueError(f"decay_rate must be a number >= 0, got {decay_rate!r}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}: expected 'adam' or 'sgd'")
        if periodic_callback is not None and not callable(periodic_callback):
            raise ValueError("periodic_callback must be callable with no arguments")
        src, lengths = self._input_batch(X, "X")
        targets = self._target_batch(Y)
        if len(src) != len(targets):
            raise ValueError(f"X has {len(src)} sequences but Y has {len(targets)}: "
                             "expected one target sequence per input sequence")
        self.target_length = targets.shape[1]

        from tqdm import tqdm

        train_seed = None if self._rng is None else int(self._rng.integers(2**62))
        with self._random_scope(train_seed), self._thread_scope(batch_size):
            rng = self._rng if self._rng is not None else np.random.default_rng(
                int(torch.randint(2**62, ()).item()))  # follows torch.manual_seed
            src_t = torch.from_numpy(src).to(self.device)
            target_t = torch.from_numpy(targets).to(self.device)
            # Teacher forcing: step t is fed target t-1; the first step a zero vector.
            tgt_in = torch.cat([torch.zeros_like(target_t[:, :1]), target_t[:, :-1]], dim=1)
            lengths_t = torch.from_numpy(lengths).to(self.device)
            opt = self._make_optimizer(optimizer, learning_rate)
            history: list[float] = []
            if periodic_callback is not None:
                periodic_callback()
            bar = tqdm(range(epochs), desc="train", unit="epoch", file=sys.stderr,
                       disable=not verbose, dynamic_ncols=True)
            for epoch in bar:
                for group in opt.param_groups:
                    group["lr"] = learning_rate / (1.0 + decay_rate * epoch)
                self.model.train()
                total = torch.zeros((), device=self.device)
                order = rng.permutation(len(src))
                for start in range(0, len(order), batch_size):
                    rows = order[start:start + batch_size]
                    width = int(lengths[rows].max())  # trim padding no sequence here needs
                    index = torch.from_numpy(rows).to(self.device)
                    scores, _ = self.model(src_t[index, :width], lengths_t[index], tgt_in[index])
                    loss = self._loss(scores, target_t[index])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += loss.detach() * len(rows)
                epoch_loss = float(total) / len(src)
                if not math.isfinite(epoch_loss):
                    raise FloatingPointError(
                        f"training diverged: the loss is {epoch_loss} in epoch {epoch}; "
                        "try a smaller learning_rate")
                history.append(epoch_loss)
                bar.set_postfix(loss=f"{epoch_loss:.4g}", refresh=False)
                if periodic_callback is not None and (epoch + 1) % callback_every == 0:
                    periodic_callback()
            bar.close()
        self.model.eval()
        return history

    def _make_optimizer(self, kind: str, lr: float) -> torch.optim.Optimizer:
        params = list(self.model.parameters())
        if kind == "sgd":
            return torch.optim.SGD(params, lr=lr)
        from seq2seq.train import make_adam

        return make_adam(params, lr)

    def _loss(self, scores: Tensor, targets: Tensor) -> Tensor:
        """scores, targets: (batch, T_out, output_size) -> mean loss per step."""
        if self.loss == "cross_entropy":
            return nn.functional.cross_entropy(scores.flatten(0, 1), targets.flatten(0, 1))
        outputs = torch.softmax(scores, -1) if self.apply_softmax else scores
        return (outputs - targets).square().sum(-1).mean()

    # -- prediction ---------------------------------------------------------------------
    def predict(self, x: Any, length: int | None = None, return_attention: bool = False
                ) -> list[np.ndarray] | tuple[list[np.ndarray], np.ndarray]:
        """Predict the output sequence for one input sequence, autoregressively.

        Args:
            x: one sequence: ``(T,)`` when input_size is 1, ``(T, input_size)``,
                ``(T, input_size, 1)`` or a list of T column vectors.
            length: output steps; defaults to the target length seen in training.
            return_attention: also return the attention weights.

        Returns:
            T_out column vectors of shape ``(output_size, 1)`` (probabilities when
            ``apply_softmax``), and with ``return_attention`` the weights too, an array of
            shape ``(T_out, T)`` whose rows sum to 1.
        """
        seq = _sequence_array(x, self.input_size, "x", hint=" (predict takes one sequence; "
                              "use predict_batch for many)")
        outputs, weights = self._decode(seq[None], np.array([len(seq)]), length, return_attention)
        columns = [step.reshape(-1, 1) for step in outputs[0]]
        if return_attention:
            return columns, weights[0]
        return columns

    def predict_batch(self, X: Any, length: int | None = None, return_attention: bool = False
                      ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Predict many sequences at once (same shapes as ``train``'s ``X``).

        Returns:
            outputs: (n, T_out, output_size); with ``return_attention`` also the weights,
            (n, T_out, T_max), zero at each sequence's padded positions.
        """
        src, lengths = self._input_batch(X, "X")
        outputs, weights = self._decode(src, lengths, length, return_attention)
        return (outputs, weights) if return_attention else outputs

    def _decode(self, src: np.ndarray, lengths: np.ndarray, length: int | None,
                return_attention: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Greedy autoregressive decoding of (n, T, input_size) inputs, in chunks."""
        if length is None:
            if self.target_length is None:
                raise ValueError("the model has not been trained yet: give the output length "
                                 "with length=")
            length = self.target_length
        _check_positive_int("length", length)
        if return_attention and self.model.decoder.attention is None:
            raise ValueError("return_attention needs a model built with attention="
                             "'bahdanau' or 'luong'")
        self.model.eval()
        outputs, weights = [], []
        with torch.inference_mode(), self._thread_scope(len(src)):
            for start in range(0, len(src), PREDICT_CHUNK):
                chunk_lengths = lengths[start:start + PREDICT_CHUNK]
                chunk = src[start:start + PREDICT_CHUNK, :int(chunk_lengths.max())]
                out, weight = self._decode_chunk(torch.from_numpy(chunk).to(self.device),
                                                 torch.from_numpy(chunk_lengths).to(self.device),
                                                 length)
                outputs.append(out.float().cpu().numpy())
                if return_attention:
                    full = np.zeros((len(chunk), length, src.shape[1]), dtype=np.float32)
                    full[:, :, :weight.size(2)] = weight.float().cpu().numpy()
                    weights.append(full)
        return np.concatenate(outputs), np.concatenate(weights) if return_attention else None

    def _decode_chunk(self, src: Tensor, lengths: Tensor, steps: int) -> tuple[Tensor, Tensor | None]:
        """src: (batch, T, input_size) -> outputs (batch, steps, output_size), weights
        (batch, steps, T) or None. Encodes once, then feeds each prediction back."""
        memory, state = self.model.encode(src, lengths)
        prev = src.new_zeros(src.size(0), 1, self.output_size)
        outputs, weights = [], []
        for _ in range(steps):
            scores, state, weight = self.model.decode(prev, state, memory)
            output = torch.softmax(scores, -1) if self.apply_softmax else scores
            outputs.append(output)
            weights.append(weight)
            # one-hot argmax for classes; for values what the model outputs (the softmax too)
            prev = self.model.prediction_to_input(scores) if self.loss == "cross_entropy" else output
        return torch.cat(outputs, 1), None if weights[0] is None else torch.cat(weights, 1)

    # -- the seed's loss ----------------------------------------------------------------
    def loss_function(self, Y_pred: Any, Y_true: Any) -> float:
        """The seed's summed loss over all steps (and sequences).

        Cross-entropy: ``-sum(y_true * log(y_pred))`` with ``y_pred`` probabilities (build the
        model with ``apply_softmax=True``); mse: ``sum((y_pred - y_true) ** 2)``.

        Args:
            Y_pred: lists of column vectors ``(output_size, 1)`` or arrays ``(..., output_size)``
                or ``(..., output_size, 1)``.
            Y_true: the same shapes, or integer classes ``(...)`` with cross-entropy.
        """
        pred = _vectors(Y_pred, self.output_size, "Y_pred")
        regular = _regular_array(Y_true)
        if regular is None:
            raise ValueError("Y_true has sequences or steps of different sizes")
        true_raw = _numeric(regular, "Y_true")
        if (self.loss == "cross_entropy" and true_raw.dtype.kind in "iu"
                and true_raw.ndim == pred.ndim - 1):
            true = _one_hot(true_raw, self.output_size, "Y_true")
        else:
            true = _vectors(true_raw, self.output_size, "Y_true")
        if pred.shape != true.shape:
            raise ValueError(f"Y_pred has shape {pred.shape} but Y_true has {true.shape} "
                             "(after removing column-vector axes): expected equal shapes")
        if pred.size == 0:
            raise ValueError(f"Y_pred is empty (shape {pred.shape}): expected at least one step "
                             f"of {self.output_size} values")
        if self.loss == "cross_entropy":
            return float(-np.sum(true * np.log(np.clip(pred, 1e-12, None))))
        return float(np.sum((pred - true) ** 2))

    # -- saving -------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """The constructor arguments and the trained target length (what ``save`` writes)."""
        values = {"format": FORMAT}
        return {key: values.get(key, getattr(self, key, None)) for key in SETTINGS_KEYS}

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ``settings.json`` and ``model.safetensors`` into the directory ``path``.

        Each file is written to a temporary name in the same directory, synced and renamed,
        so a crash never leaves a half-written file under the real name.
        """
        from safetensors.torch import save as safetensors_bytes

        folder = Path(path)
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"{folder} is a file: save() writes a directory "
                             f"({SETTINGS_FILE} and {WEIGHTS_FILE})")
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        atomic_write_bytes(folder / WEIGHTS_FILE, safetensors_bytes(tensors))
        atomic_write_json(folder / SETTINGS_FILE, self.settings())

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str = "auto") -> EncoderDecoderRNN:
        """Read a model written by ``save``. Nothing is unpickled: JSON and safetensors only."""
        from safetensors.torch import load_file

        folder = Path(path)
        settings_path, weights_path = folder / SETTINGS_FILE, folder / WEIGHTS_FILE
        for file in (settings_path, weights_path):
            if not file.is_file():
                raise ValueError(f"{file} not found: expected a directory written by save()")
        try:
            settings = json.loads(settings_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{settings_path}: not valid JSON: {error}") from None
        if not isinstance(settings, dict):
            raise ValueError(f"{settings_path}: expected a JSON object of settings")
        expected = set(SETTINGS_KEYS)
        unknown, missing = sorted(set(settings) - expected), sorted(expected - set(settings))
        if unknown:
            raise ValueError(f"{settings_path}: unknown setting(s) {', '.join(unknown)}; "
                             f"expected {', '.join(sorted(expected))}")
        if missing:
            raise ValueError(f"{settings_path}: missing setting(s) {', '.join(missing)}")
        if settings.pop("format") != FORMAT:
            raise ValueError(f"{settings_path}: format must be {FORMAT!r}")
        target_length = settings.pop("target_length")
        if target_length is not None and (not isinstance(target_length, int)
                                          or isinstance(target_length, bool) or target_length < 1):
            raise ValueError(f"{settings_path}: target_length must be null or a positive integer, "
                             f"got {target_length!r}")
        input_size, hidden_size, output_size = (settings.pop(k) for k in
                                                ("input_size", "hidden_size", "output_size"))
        try:  # the described model, shapes only: checked against the weights before allocating
            with shapes_only():
                skeleton = cls(input_size, hidden_size, output_size, device="meta", **settings)
        except ValueError as error:
            raise ValueError(f"{settings_path}: {error}") from None
        except RuntimeError as error:  # sizes past what any machine holds
            raise ValueError(f"{settings_path}: cannot build the model it describes: {error}") from None
        check_shapes(weights_path, skeleton.model, prefix="")
        rnn = cls(input_size, hidden_size, output_size, device=device, **settings)
        rnn.target_length = target_length

        try:
            tensors = load_file(str(weights_path))
        except Exception as error:  # safetensors raises its own error types
            raise ValueError(f"{weights_path}: not a valid safetensors file: {error}") from None
        own = rnn.model.state_dict()
        unknown, missing = sorted(set(tensors) - set(own)), sorted(set(own) - set(tensors))
        if unknown or missing:
            raise ValueError(f"{weights_path}: tensors do not match the settings: "
                             f"unknown {unknown or 'none'}, missing {missing or 'none'}")
        for name, tensor in tensors.items():
            if tensor.shape != own[name].shape or tensor.dtype != own[name].dtype:
                raise ValueError(f"{weights_path}: tensor {name!r} has shape "
                                 f"{tuple(tensor.shape)} ({tensor.dtype}), expected "
                                 f"{tuple(own[name].shape)} ({own[name].dtype})")
        rnn.model.load_state_dict(tensors)
        rnn.model.eval()
        return rnn

    # -- inputs -------------------------------------------------------------------------
    def _input_batch(self, X: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Any accepted X -> padded float32 (n, T_max, input_size), int64 lengths (n,)."""
        regular = _regular_array(X)
        if regular is not None:
            arr = _numeric(regular, name)
            if arr.size == 0:
                raise ValueError(f"{name} is empty (shape {arr.shape}): expected at least one "
                                 "sequence of at least one step")
            arr = _to_steps_by_features(arr, self.input_size)
            if arr.ndim != 3:
                raise ValueError(
                    f"{name} has shape {arr.shape}: expected (n, T, {self.input_size}) or "
                    f"(n, T, {self.input_size}, 1)"
                    + (", or (n, T) since input_size is 1" if self.input_size == 1 else ""))
            if arr.shape[2] != self.input_size:
                raise ValueError(f"{name} has {arr.shape[2]} features per step (shape {arr.shape})"
                                 f" but the model's input_size is {self.input_size}")
            _check_finite(arr, name)
            return arr.astype(np.float32), np.full(len(arr), arr.shape[1], dtype=np.int64)
        if len(X) == 0:
            raise ValueError(f"{name} is empty: expected at least one sequence")
        seqs = [_sequence_array(x, self.input_size, f"{name}[{i}]") for i, x in enumerate(X)]
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        padded = np.zeros((len(seqs), int(lengths.max()), self.input_size), dtype=np.float32)
        for i, s in enumerate(seqs):
            padded[i, :len(s)] = s
        return padded, lengths

    def _target_batch(self, Y: Any) -> np.ndarray:
        """Any accepted Y -> float32 (n, T_out, output_size) vectors."""
        regular = _regular_array(Y)
        if regular is None:
            raise ValueError("Y's sequences have different lengths: expected every target "
                             "sequence to have the same length T_out")
        arr = _numeric(regular, "Y")
        if arr.ndim == 2 and arr.dtype.kind in "iu" and self.loss == "cross_entropy":
            if arr.size == 0:
                raise ValueError(f"Y is empty (shape {arr.shape})")
            return _one_hot(arr, self.output_size, "Y")
        arr = _to_steps_by_features(arr, self.output_size)
        if arr.ndim != 3:
            raise ValueError(
                f"Y has shape {arr.shape}: expected (n, T_out, {self.output_size}), "
                f"(n, T_out, {self.output_size}, 1)"
                + (" or integer classes (n, T_out)" if self.loss == "cross_entropy" else ""))
        if arr.size == 0:
            raise ValueError(f"Y is empty (shape {arr.shape}): expected at least one sequence "
                             "of at least one step")
        if arr.shape[2] != self.output_size:
            raise ValueError(f"Y has {arr.shape[2]} values per step (shape {arr.shape}) but the "
                             f"model's output_size is {self.output_size}")
        _check_finite(arr, "Y")
        arr = arr.astype(np.float32)
        if self.loss == "cross_entropy" and (
                (arr < 0).any() or not np.allclose(arr.sum(-1), 1.0, atol=1e-3)):
            raise ValueError("cross-entropy targets must be probability vectors (one-hot or "
                             "soft: non-negative, summing to 1 at each step) or integer classes")
        return arr

    # -- scopes -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _random_scope(self, seed: int | None) -> Iterator[None]:
        """With a seed, run on a private copy of torch's generators seeded with it; the
        caller's global random state is left as it was."""
        if seed is None:
            yield
            return
        devices = [self.device.index or 0] if getattr(self, "device", None) is not None \
            and self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield

    @contextlib.contextmanager
    def _thread_scope(self, batch: int) -> Iterator[None]:
        """Small models on small batches run faster on one CPU thread (measured); the
        caller's thread setting comes back afterwards."""
        before = torch.get_num_threads()
        small = self.hidden_size <= SMALL_MODEL_HIDDEN and batch <= 64
        if self.device.type == "cpu" and small and before > SMALL_MODEL_THREADS:
            torch.set_num_threads(SMALL_MODEL_THREADS)
        try:
            yield
        finally:
            if torch.get_num_threads() != before:
                torch.set_num_threads(before)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings().items() if k != "format")
        return f"EncoderDecoderRNN({args}, device={str(self.device)!r})"


def _initialise_rnn(rnn: nn.RNNBase) -> None:
    """Initialisation for vector inputs (measured on the seed example: all 50 sequences right
    after 125 epochs instead of 150 to 350).

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
                bound = math.sqrt(3.0 / weight.size(1))
                weight.uniform_(-bound, bound)


# -- helpers for arrays (module-private) ---------------------------------------------------
def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def _check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _pick_device(device: Any) -> torch.device:
    from seq2seq.translator import resolve_device

    try:
        return resolve_device("auto" if device is None else device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}: expected 'auto', 'cpu', 'cuda' or "
                         "'cuda:N'") from None


def _regular_array(value: Any) -> np.ndarray | None:
    """The value as one array, or None when its sequences have different lengths."""
    if isinstance(value, np.ndarray) and value.dtype != object:
        return value
    try:
        arr = np.asarray(value)
    except ValueError:  # numpy refuses ragged nested lists
        return None
    return None if arr.dtype == object and arr.ndim >= 1 and _ragged(arr) else arr


def _ragged(arr: np.ndarray) -> bool:
    return any(isinstance(item, Sequence | np.ndarray) for item in arr.flat)


def _to_steps_by_features(arr: np.ndarray, features: int) -> np.ndarray:
    """(n, T, features, 1) column vectors -> (n, T, features); (n, T) -> (n, T, 1) when
    there is one feature. Other shapes are returned as they are, for the caller to refuse."""
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2 and features == 1:
        arr = arr[..., None]
    return arr


def _numeric(value: Any, name: str) -> np.ndarray:
    arr = value if isinstance(value, np.ndarray) else np.asarray(value)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must contain numbers, got dtype {arr.dtype}")
    return arr


def _check_finite(arr: np.ndarray, name: str) -> None:
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values: expected finite numbers")


def _sequence_array(x: Any, size: int, name: str, hint: str = "") -> np.ndarray:
    """One sequence -> float32 (T, size): from (T,) when size is 1, (T, size), (T, size, 1)."""
    regular = _regular_array(x)
    if regular is None:
        raise ValueError(f"{name} has steps of different sizes: expected {size} features each")
    arr = _numeric(regular, name)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 1 and size == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"{name} has shape {arr.shape}: expected one sequence (T, {size}) or "
                         f"(T, {size}, 1)" + (", or (T,) since input_size is 1" if size == 1 else "")
                         + hint)
    if len(arr) == 0:
        raise ValueError(f"{name} is empty: expected a sequence of at least one step")
    if arr.shape[1] != size:
        raise ValueError(f"{name} has {arr.shape[1]} features per step (shape {arr.shape}) but "
                         f"the model's input_size is {size}{hint}")
    _check_finite(arr, name)
    return arr.astype(np.float32)


def _vectors(value: Any, size: int, name: str) -> np.ndarray:
    """Steps of ``size`` values, column-vector axes removed: (..., size) float64."""
    regular = _regular_array(value)
    if regular is None:
        raise ValueError(f"{name} has sequences or steps of different sizes")
    arr = _numeric(regular, name).astype(np.float64)
    if arr.ndim >= 2 and arr.shape[-1] == 1 and arr.shape[-2] == size:
        arr = arr[..., 0]
    if arr.ndim == 0 or arr.shape[-1] != size:
        raise ValueError(f"{name} has shape {arr.shape}: expected steps of {size} values, "
                         f"(..., {size}) or (..., {size}, 1)")
    _check_finite(arr, name)
    return arr


def _one_hot(classes: np.ndarray, size: int, name: str) -> np.ndarray:
    if classes.size and (classes.min() < 0 or classes.max() >= size):
        raise ValueError(f"{name} has class ids from {classes.min()} to {classes.max()}: "
                         f"expected 0 to {size - 1} (output_size {size})")
    return np.eye(size, dtype=np.float32)[classes]
