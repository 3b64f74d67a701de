"""``EncoderDecoderRNN``: the NumPy-friendly face of the library.

Users give and get NumPy arrays (the shapes accepted: ``arrays.py``); inside, one ``Seq2Seq``
model core reads real vectors and writes class scores (``loss='cross_entropy'``) or real
values (``loss='mse'``)::

    rnn = EncoderDecoderRNN(1, 200, 50, apply_softmax=True, loss="cross_entropy")
    rnn.train(X, Y, epochs=500, learning_rate=1e-4)   # X (n, T), Y (n, T_out, 50, 1)
    y = rnn.predict(x)                                  # T_out column vectors (50, 1)

``save`` writes ``settings.json`` and ``model.safetensors``, a checkpoint of ``checkpoint.py``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from seq2seq import files
from seq2seq.config import CELLS, MAX_LAYERS, ModelConfig, normalize_attention, quote
from seq2seq.device import resolve_device
from seq2seq.kernels import apply as apply_kernels
from seq2seq.kernels import decoding_session
from seq2seq.models import checkpoint
from seq2seq.models.rnn.model import Seq2Seq
from seq2seq.training.schedule import make_adam
from seq2seq.vectors import arrays

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
MAX_LENGTH = 100_000  # output steps that predict and predict_batch decode at most
MAX_OUTPUT_VALUES = 1 << 30  # values (4 bytes each) one predict_batch call returns at most


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
        _check_settings(input_size, hidden_size, output_size, apply_softmax, loss, cell, attention,
                        num_layers, bidirectional, dropout, seed)
        self.input_size, self.hidden_size = int(input_size), int(hidden_size)
        self.output_size, self.apply_softmax = int(output_size), bool(apply_softmax)
        self.loss, self.cell, self.attention = loss, cell, attention
        self.num_layers, self.bidirectional = int(num_layers), bool(bidirectional)
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
        with _random_scope(self.seed, self.device):  # initialise on CPU: same weights on any device
            self.model = Seq2Seq(config, src_features=self.input_size, tgt_features=self.output_size,
                                 vector_feedback="onehot" if loss == "cross_entropy" else "identity",
                                 rnn_init="orthogonal")
        apply_kernels(self.model, "fast", self.device)  # the policy for the device; moves re-decide

    # -- training -----------------------------------------------------------------------
    def train(self, X: Any, Y: Any, epochs: int, learning_rate: float, decay_rate: float = 0.0,
              periodic_callback: Callable[[], Any] | None = None, *, batch_size: int = 64,
              optimizer: str = "adam", callback_every: int = 10,
              verbose: bool = True) -> list[float]:
        """Train with teacher forcing; the learning rate of epoch ``e`` (from 0) is
        ``learning_rate / (1 + decay_rate * e)``.

        Args:
            X: n input sequences (see ``arrays.py`` for the shapes).
            Y: n target sequences, all of one length T_out: ``(n, T_out, output_size)``,
                ``(n, T_out, output_size, 1)``, or integer classes ``(n, T_out)`` with
                cross-entropy.
            epochs: passes over the data.
            learning_rate: the optimizer's step size.
            decay_rate: the learning-rate decay per epoch.
            periodic_callback: called with no arguments before training and after every
                ``callback_every`` epochs.
            batch_size: sequences per update. The default, 64, trains the seed example (50
                sequences, hidden 200) fastest of those measured (benchmarks/seed_example.py).
            optimizer: ``'adam'`` or ``'sgd'``.
            verbose: a progress bar with the loss on stderr.

        Returns:
            the mean training loss of each epoch.

        Raises:
            FloatingPointError: when the loss (or a weight) becomes NaN or infinite, as with a
                learning rate that diverges. The model keeps its last good weights, those after
                the last epoch whose loss and weights were finite (or from before the call),
                restored in memory; the error's ``history`` holds those epochs' losses. The
                optimizer's state lives only for one call, so it needs no restoring.
        """
        _check_training(epochs, learning_rate, decay_rate, periodic_callback, batch_size, optimizer,
                        callback_every)
        src, lengths = arrays.input_batch(X, "X", self.input_size)
        targets = arrays.target_batch(Y, self.output_size, classes=self.loss == "cross_entropy")
        if len(src) != len(targets):
            raise ValueError(f"X has {len(src)} sequences but Y has {len(targets)}: "
                             "expected one target sequence per input sequence")
        trained_length, self.target_length = self.target_length, targets.shape[1]
        train_seed = None if self._rng is None else int(self._rng.integers(2**62))
        with _random_scope(train_seed, self.device), _threads_for(self, batch_size):
            rng = self._rng if self._rng is not None else np.random.default_rng(
                int(torch.randint(2**62, ()).item()))  # follows torch.manual_seed
            opt = _make_optimizer(self.model, optimizer, learning_rate)
            try:
                history = _fit(self, src, lengths, targets, opt, rng, epochs, batch_size,
                               lambda epoch: learning_rate / (1.0 + decay_rate * epoch),
                               periodic_callback, callback_every, verbose)
            except FloatingPointError as error:
                if not getattr(error, "epochs_kept", 0):  # back to the weights from before this call
                    self.target_length = trained_length
                raise
            finally:
                self.model.eval()
        return history

    # -- prediction ---------------------------------------------------------------------
    def predict(self, x: Any, length: int | None = None, return_attention: bool = False
                ) -> list[np.ndarray] | tuple[list[np.ndarray], np.ndarray]:
        """Predict the output sequence for one input sequence, autoregressively.

        Args:
            x: one sequence: ``(T,)`` when input_size is 1, ``(T, input_size)``,
                ``(T, input_size, 1)`` or a list of T column vectors.
            length: output steps, at most ``MAX_LENGTH`` (100,000); defaults to the target
                length seen in training.
            return_attention: also return the attention weights.

        Returns:
            T_out column vectors of shape ``(output_size, 1)`` (probabilities when
            ``apply_softmax``), and with ``return_attention`` the weights too, an array of
            shape ``(T_out, T)`` whose rows sum to 1.
        """
        seq = arrays.sequence(x, self.input_size, "x", hint=" (predict takes one sequence; use "
                       "predict_batch for many)")
        outputs, weights = self._decode(seq[None], np.array([len(seq)]), length, return_attention)
        columns = [step.reshape(-1, 1) for step in outputs[0]]
        return (columns, weights[0]) if return_attention else columns

    def predict_batch(self, X: Any, length: int | None = None, return_attention: bool = False
                      ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Predict many sequences at once (same shapes as ``train``'s ``X``).

        Returns:
            outputs: (n, T_out, output_size); with ``return_attention`` also the weights,
            (n, T_out, T_max), zero at each sequence's padded positions.
        """
        src, lengths = arrays.input_batch(X, "X", self.input_size)
        outputs, weights = self._decode(src, lengths, length, return_attention)
        return (outputs, weights) if return_attention else outputs

    def _decode(self, src: np.ndarray, lengths: np.ndarray, length: int | None,
                return_attention: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Greedy autoregressive decoding of (n, T, input_size) inputs, in chunks."""
        if length is None:
            if self.target_length is None:
                raise ValueError("the model has not been trained yet: give the output length with length=")
            length = self.target_length
        arrays.check_positive_int("length", length)
        if length > MAX_LENGTH:
            raise ValueError(f"length must be at most {MAX_LENGTH:,} output steps (MAX_LENGTH), got "
                             f"{length:,}: each step runs the decoder once, so a huge length would run "
                             f"for hours")
        values = len(src) * length * (self.output_size + (src.shape[1] if return_attention else 0))
        if values > MAX_OUTPUT_VALUES:
            raise ValueError(f"length={length:,} for {len(src):,} sequence(s) asks for {values:,} output "
                             f"values, more than the {MAX_OUTPUT_VALUES:,} (MAX_OUTPUT_VALUES) one call "
                             f"returns: predict fewer sequences at a time, or fewer steps")
        if return_attention and self.model.decoder.attention is None:
            raise ValueError("return_attention needs a model built with attention='bahdanau' or 'luong'")
        self.model.eval()
        outputs, weights = [], []
        with torch.inference_mode(), _threads_for(self, len(src)):
            for start in range(0, len(src), PREDICT_CHUNK):
                chunk_lengths = lengths[start:start + PREDICT_CHUNK]
                chunk = src[start:start + PREDICT_CHUNK, :int(chunk_lengths.max())]
                out, weight = _decode_steps(self.model, torch.from_numpy(chunk).to(self.device),
                                            torch.from_numpy(chunk_lengths).to(self.device), length,
                                            self.apply_softmax, self.loss == "cross_entropy")
                outputs.append(out.float().cpu().numpy())
                if return_attention:
                    full = np.zeros((len(chunk), length, src.shape[1]), dtype=np.float32)
                    full[:, :, :weight.size(2)] = weight.float().cpu().numpy()
                    weights.append(full)
        return np.concatenate(outputs), np.concatenate(weights) if return_attention else None

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
        return _summed_loss(Y_pred, Y_true, self.output_size, self.loss == "cross_entropy")

    # -- saving -------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """The constructor arguments and the trained target length (what ``save`` writes)."""
        values = {"format": FORMAT}
        return {key: values.get(key, getattr(self, key, None)) for key in SETTINGS_KEYS}

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ``settings.json`` and ``model.safetensors`` into the directory ``path``, each
        atomically (a crash never leaves a half-written file under the real name).

        Weights that are NaN or infinite are refused (a ``ValueError`` naming one) before
        anything is written: a good model saved there earlier stays as it was."""
        folder = Path(path)
        bad = next((name for name, value in self.model.state_dict().items()
                    if value.is_floating_point() and not bool(value.isfinite().all())), None)
        if bad is not None:
            raise ValueError(f"the weight {bad} holds NaN or infinite values (training diverged?): "
                             f"not saved, {folder} is left as it was")
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"{folder} is a file: save() writes a directory "
                             f"({SETTINGS_FILE} and {WEIGHTS_FILE})")
        folder.mkdir(parents=True, exist_ok=True)
        checkpoint.save_checkpoint(folder / WEIGHTS_FILE, self.model, {"format": FORMAT})
        files.atomic_write_json(folder / SETTINGS_FILE, self.settings())

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str = "auto") -> EncoderDecoderRNN:
        """Read a model written by ``save``. Nothing is unpickled: JSON and safetensors only."""
        return _load(cls, Path(path), device)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings().items() if k != "format")
        return f"EncoderDecoderRNN({args}, device={str(self.device)!r})"


@contextlib.contextmanager
def _random_scope(seed: int | None, device: torch.device) -> Iterator[None]:
    """With a seed, run on a private copy of torch's generators seeded with it; the caller's
    global random state is left as it was."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _threads_for(rnn: EncoderDecoderRNN, batch: int) -> Iterator[None]:
    """Small models on small batches run faster on one CPU thread (measured); the caller's
    thread setting comes back afterwards."""
    before = torch.get_num_threads()
    small = rnn.hidden_size <= SMALL_MODEL_HIDDEN and batch <= 64
    if rnn.device.type == "cpu" and small and before > SMALL_MODEL_THREADS:
        torch.set_num_threads(SMALL_MODEL_THREADS)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _fit(rnn: EncoderDecoderRNN, src: np.ndarray, lengths: np.ndarray, targets: np.ndarray,
         opt: torch.optim.Optimizer, rng: np.random.Generator, epochs: int, batch_size: int,
         learning_rate: Callable[[int], float], periodic_callback: Callable[[], Any] | None,
         callback_every: int, verbose: bool) -> list[float]:
    """``EncoderDecoderRNN.train``'s loop, teacher forced, over checked arrays: src (n, T,
    input_size), lengths (n,), targets (n, T_out, output_size) or classes (n, T_out). Returns
    the mean loss of each epoch; ``learning_rate`` gives the rate of each epoch (from 0)."""
    model, device = rnn.model, rnn.device
    src_t, lengths_t = (torch.from_numpy(a).to(device) for a in (src, lengths))
    target_t = torch.from_numpy(targets).to(device)
    # Teacher forcing: step t is fed target t-1; the first step a zero vector.
    tgt_in = torch.cat([torch.zeros_like(target_t[:, :1]), target_t[:, :-1]], dim=1)
    history: list[float] = []
    # the last good weights (and buffers): from before training, then after each finite epoch
    live = list(model.state_dict(keep_vars=True).values())
    good = [value.detach().clone() for value in live]
    params = list(model.parameters())
    if periodic_callback is not None:
        periodic_callback()
    bar = tqdm(range(epochs), desc="train", unit="epoch", file=sys.stderr, disable=not verbose,
               dynamic_ncols=True)
    for epoch in bar:
        for group in opt.param_groups:
            group["lr"] = learning_rate(epoch)
        model.train()
        total = torch.zeros((), device=device)
        order = rng.permutation(len(src))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = int(lengths[rows].max())  # trim padding no sequence here needs
            index = torch.from_numpy(rows).to(device)
            scores, _ = model(src_t[index, :width], lengths_t[index], tgt_in[index])
            loss = _vector_loss(scores, target_t[index], rnn.loss, rnn.apply_softmax)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * len(rows)
        epoch_loss = float(total) / len(src)
        with torch.no_grad():  # a float64 sum is finite exactly when every float32 value is
            weights_finite = bool(torch.stack([p.sum(dtype=torch.float64) for p in params]).isfinite().all())
        if not math.isfinite(epoch_loss) or not weights_finite:
            bar.close()
            with torch.no_grad():
                for value, kept in zip(live, good):
                    value.copy_(kept)
            kept = f"those after epoch {epoch - 1}" if epoch else "those from before this call"
            what = f"the loss is {epoch_loss}" if not math.isfinite(epoch_loss) else "a weight is not finite"
            error = FloatingPointError(f"training diverged: {what} in epoch {epoch}; the model keeps its "
                                       f"last good weights, {kept}; try a smaller learning_rate")
            error.history, error.epochs_kept = history, epoch  # type: ignore[attr-defined]
            raise error
        with torch.no_grad():
            for value, kept in zip(live, good):
                kept.copy_(value)
        history.append(epoch_loss)
        bar.set_postfix(loss=f"{epoch_loss:.4g}", refresh=False)
        if periodic_callback is not None and (epoch + 1) % callback_every == 0:
            periodic_callback()
    bar.close()
    return history


def _make_optimizer(model: nn.Module, kind: str, lr: float) -> torch.optim.Optimizer:
    params = list(model.parameters())
    return torch.optim.SGD(params, lr=lr) if kind == "sgd" else make_adam(params, lr)


def _load(cls: type[EncoderDecoderRNN], folder: Path, device: Any) -> EncoderDecoderRNN:
    """``EncoderDecoderRNN.load``: the settings checked, then the weights' names and shapes
    against a model built on the meta device, before anything is allocated."""
    settings_path, weights_path = folder / SETTINGS_FILE, folder / WEIGHTS_FILE
    for file in (settings_path, weights_path):
        if not file.is_file():
            raise ValueError(f"{file} not found: expected a directory written by save()")
    settings = _read_settings(settings_path)
    target_length = settings.pop("target_length")
    sizes = [settings.pop(k) for k in ("input_size", "hidden_size", "output_size")]
    try:  # the described model, shapes only: checked against the weights before allocating
        with checkpoint.shapes_only():
            skeleton = cls(*sizes, device=torch.device("meta"), **settings)
    except ValueError as error:
        raise ValueError(f"{settings_path}: {error}") from None
    except RuntimeError as error:  # sizes past what any machine holds
        raise ValueError(f"{settings_path}: cannot build the model it describes: {error}") from None
    checkpoint.check_shapes(weights_path, skeleton.model)
    rnn = cls(*sizes, device=device, **settings)
    rnn.target_length = target_length
    checkpoint.load_model(weights_path, rnn.model)
    rnn.model.eval()
    return rnn


def _check_settings(input_size: Any, hidden_size: Any, output_size: Any, apply_softmax: Any, loss: Any,
                    cell: Any, attention: Any, num_layers: Any, bidirectional: Any, dropout: Any,
                    seed: Any) -> None:
    for name, value in (("input_size", input_size), ("hidden_size", hidden_size),
                        ("output_size", output_size), ("num_layers", num_layers)):
        arrays.check_positive_int(name, value)
    if num_layers > MAX_LAYERS:  # building 20,000 layers takes minutes, even on meta
        raise ValueError(f"num_layers must be at most {MAX_LAYERS}, got {num_layers}")
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {quote(loss)}: expected 'mse' or 'cross_entropy'")
    if cell not in CELLS:
        raise ValueError(f"unknown cell {quote(cell)}: expected one of {', '.join(map(repr, CELLS))}")
    if attention is not None and not isinstance(attention, str):
        raise ValueError(f"attention must be None or a name, got {quote(attention)}")
    normalize_attention(attention)  # raises ValueError naming the choices
    if not arrays.is_number(dropout) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a number in [0, 1), got {quote(dropout)}")
    for name, flag in (("apply_softmax", apply_softmax), ("bidirectional", bidirectional)):
        if not isinstance(flag, bool | np.bool_):
            raise ValueError(f"{name} must be True or False, got {quote(flag)}")
    if seed is not None and (not isinstance(seed, int | np.integer) or isinstance(seed, bool) or seed < 0):
        raise ValueError(f"seed must be None or a non-negative integer, got {quote(seed)}")


def _check_training(epochs: Any, learning_rate: Any, decay_rate: Any, periodic_callback: Any,
                    batch_size: Any, optimizer: Any, callback_every: Any) -> None:
    arrays.check_positive_int("epochs", epochs)
    arrays.check_positive_int("batch_size", batch_size)
    arrays.check_positive_int("callback_every", callback_every)
    if not arrays.is_number(learning_rate) or not learning_rate > 0 or not math.isfinite(learning_rate):
        raise ValueError(f"learning_rate must be a positive number, got {quote(learning_rate)}")
    if not arrays.is_number(decay_rate) or not decay_rate >= 0 or not math.isfinite(decay_rate):
        raise ValueError(f"decay_rate must be a number >= 0, got {quote(decay_rate)}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {quote(optimizer)}: expected 'adam' or 'sgd'")
    if periodic_callback is not None and not callable(periodic_callback):
        raise ValueError("periodic_callback must be callable with no arguments")


def _read_settings(path: Path) -> dict[str, Any]:
    """``settings.json``: every key of ``SETTINGS_KEYS`` (the format removed), checked."""
    try:
        settings = json.loads(files.read_regular_file(path).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON: {error}") from None
    except RecursionError:
        raise ValueError(f"{path}: not valid JSON: nested too deeply") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: expected a JSON object of settings")
    expected = set(SETTINGS_KEYS)
    unknown, missing = sorted(set(settings) - expected), sorted(expected - set(settings))
    if unknown:
        raise ValueError(f"{path}: unknown setting(s) {', '.join(unknown)}; "
                         f"expected {', '.join(sorted(expected))}")
    if missing:
        raise ValueError(f"{path}: missing setting(s) {', '.join(missing)}")
    if settings.pop("format") != FORMAT:
        raise ValueError(f"{path}: format must be {FORMAT!r}")
    target_length = settings["target_length"]
    if target_length is not None and (not isinstance(target_length, int)
                                      or isinstance(target_length, bool) or target_length < 1):
        raise ValueError(f"{path}: target_length must be null or a positive integer, "
                         f"got {quote(target_length)}")
    return settings


def _pick_device(device: Any) -> torch.device:
    if isinstance(device, torch.device):  # load() builds its shapes-only skeleton on "meta"
        return device
    try:
        return resolve_device("auto" if device is None else device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {quote(device)}: expected 'auto', 'cpu', 'cuda' or "
                         "'cuda:N'") from None


def _vector_loss(scores: Tensor, targets: Tensor, loss: str, apply_softmax: bool) -> Tensor:
    """scores, targets: (batch, T_out, output_size) -> mean loss per step."""
    if loss == "cross_entropy":
        return nn.functional.cross_entropy(scores.flatten(0, 1), targets.flatten(0, 1))
    outputs = torch.softmax(scores, -1) if apply_softmax else scores
    return (outputs - targets).square().sum(-1).mean()


def _decode_steps(model: Seq2Seq, src: Tensor, lengths: Tensor, steps: int, apply_softmax: bool,
                  classes: bool) -> tuple[Tensor, Tensor | None]:
    """src: (batch, T, input_size) -> outputs (batch, steps, output_size), weights (batch, steps, T)
    or None. Encodes once, then feeds each prediction back: its one-hot argmax for ``classes``,
    else the output itself (the softmax too)."""
    session = decoding_session(model)  # this call's decoding state
    memory, state = session.encode(src, lengths)
    prev = src.new_zeros(src.size(0), 1, model.generator.out_features)
    outputs, weights = [], []
    for _ in range(steps):
        scores, state, weight = session.step(prev, state, memory)
        output = torch.softmax(scores, -1) if apply_softmax else scores
        outputs.append(output)
        weights.append(weight)
        prev = model.prediction_to_input(scores) if classes else output
    return torch.cat(outputs, 1), None if weights[0] is None else torch.cat(weights, 1)


def _summed_loss(Y_pred: Any, Y_true: Any, size: int, cross_entropy: bool) -> float:
    """``EncoderDecoderRNN.loss_function``, in NumPy."""
    pred = arrays.vectors(Y_pred, size, "Y_pred")
    regular = arrays.regular_array(Y_true)
    if regular is None:
        raise ValueError("Y_true has sequences or steps of different sizes")
    true_raw = arrays.numeric(regular, "Y_true")
    if cross_entropy and true_raw.dtype.kind in "iu" and true_raw.ndim == pred.ndim - 1:
        true = arrays.one_hot(true_raw, size, "Y_true")
    else:
        true = arrays.vectors(true_raw, size, "Y_true")
    if pred.shape != true.shape:
        raise ValueError(f"Y_pred has shape {pred.shape} but Y_true has {true.shape} "
                         "(after removing column-vector axes): expected equal shapes")
    if pred.size == 0:
        raise ValueError(f"Y_pred is empty (shape {pred.shape}): expected at least one step "
                         f"of {size} values")
    if cross_entropy:
        return float(-np.sum(true * np.log(np.clip(pred, 1e-12, None))))
    return float(np.sum((pred - true) ** 2))
