"""Ensembles: several trained models decoding as one, through the decoding interface.

At each step an ``EnsembleSession`` asks every member's own session (``models/interface.py``:
RNN, Transformer, plain or through the kernels) for its scores, turns each into
log-probabilities and returns their weighted mean (weights summing to one). That mean is the
score the search ranks by, as is (``scores_are_log_probs``): the mean of log-probabilities does
not sum to one over the vocabulary, and renormalising it would make a hypothesis's score
something other than the weighted mean of its members' scores (what OpenNMT-py, Sockeye's
``log_linear`` and Marian compute). An ensemble of one model is that model, score for score.

Members must read the same source ids and write the same target ids, so they share both
tokenizers (``check_shared_tokenizers``); they may differ in family and size. Attention
weights are the mean of those of the members that have attention.

Scores rounded in bf16 (``rounds_scores``) are refused: the search's exact rescoring of a
candidate needs one normaliser per member, which the mean hides; decode with fp32.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from seq2seq.config import ConfigError
from seq2seq.data.tokenizers import Tokenizer
from seq2seq.files import read_plain_json
from seq2seq.kernels import decoding_session
from seq2seq.model_dir import TOKENIZER_FILE, VOCAB_SUFFIX
from seq2seq.models.interface import DecodingSession


def ensemble_weights(weights: Sequence[float] | None, members: int) -> tuple[float, ...]:
    """``weights`` (one per member, each > 0; default: equal) scaled to sum to one."""
    if members < 1:
        raise ConfigError("an ensemble needs at least one model")
    if weights is None:
        return (1.0 / members,) * members
    weights = [float(w) for w in weights]
    if len(weights) != members:
        raise ConfigError(f"ensemble weights: {len(weights)} given for {members} models")
    if not all(w > 0 and w < float("inf") for w in weights):
        raise ConfigError(f"ensemble weights must be finite and > 0, got {weights}")
    total = sum(weights)
    return tuple(w / total for w in weights)


class EnsembleSession:
    """One decoding call of an ensemble: see ``models.interface.DecodingSession``. Its memory
    and state are tuples of the members' own, in member order."""

    rounds_scores = False
    scores_are_log_probs = True  # step's scores are log-probabilities: the search uses them as is

    def __init__(self, sessions: Sequence[DecodingSession], weights: Sequence[float]) -> None:
        for i, session in enumerate(sessions):
            if session.rounds_scores:
                raise ConfigError(f"ensemble member {i + 1} rounds its output scores (bf16 decoding on "
                                  f"CPU); decode an ensemble with --precision fp32")
        self.sessions, self.weights = list(sessions), list(weights)

    def encode(self, src: Tensor, src_lengths: Tensor) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        encoded = [session.encode(src, src_lengths) for session in self.sessions]
        return tuple(memory for memory, _ in encoded), tuple(state for _, state in encoded)

    def step(self, prev: Tensor, state: tuple[Any, ...], memory: tuple[Any, ...],
             beams: int = 1) -> tuple[Tensor, tuple[Any, ...], Tensor | None]:
        """(rows, 1) ids -> (rows, 1, vocab) the weighted mean of the members' float32
        log-probabilities, the members' new states, and the mean (rows, 1, src_len) attention
        of the members that have it (None if none has)."""
        total: Tensor | None = None
        states, attention = [], []
        for session, weight, own_state, own_memory in zip(self.sessions, self.weights, state, memory):
            scores, own_state, weights = session.step(prev, own_state, own_memory, beams)
            log_probs = torch.log_softmax(scores.float(), dim=-1)
            total = log_probs * weight if total is None else total + log_probs * weight
            states.append(own_state)
            if weights is not None:
                attention.append(weights.float())
        mean_attention = None if not attention else sum(attention[1:], attention[0]) / len(attention)
        return total, tuple(states), mean_attention

    def reorder_state(self, state: tuple[Any, ...], index: Tensor) -> tuple[Any, ...]:
        return tuple(s.reorder_state(own, index) for s, own in zip(self.sessions, state))

    def reorder_memory(self, memory: tuple[Any, ...], index: Tensor) -> tuple[Any, ...]:
        return tuple(s.reorder_memory(own, index) for s, own in zip(self.sessions, memory))

    def exact_logits(self, rows: Tensor, tokens: Tensor) -> Tensor | None:
        return None


class Ensemble(nn.Module):
    """Member models decoded together; holds parameters only (its members'), as a model does.
    ``weights``: one per member (default equal), scaled to sum to one."""

    def __init__(self, members: Sequence[nn.Module], weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.weights = ensemble_weights(weights, len(self.members))

    def session(self, attention_layer: int = -1, attention_head: int = -1) -> EnsembleSession:
        """A session for one decoding call: each member's own (``kernels.decoding_session``)."""
        return EnsembleSession([decoding_session(m, attention_layer, attention_head)
                                for m in self.members], self.weights)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("an Ensemble decodes only (through its session); train its members one by one")


def session_for(model: nn.Module, attention_layer: int = -1, attention_head: int = -1) -> DecodingSession:
    """The decoding session of ``model``: an ensemble's own, else ``kernels.decoding_session``."""
    if isinstance(model, Ensemble):
        return model.session(attention_layer, attention_head)
    return decoding_session(model, attention_layer, attention_head)


def tokenizer_paths(model_dir: Path) -> tuple[Path, Path]:
    """The (source, target) ``*.vocab.json`` files that ``model_dir``'s tokenizer.json names."""
    spec = read_plain_json(Path(model_dir) / TOKENIZER_FILE)  # already checked by load_tokenizers
    return tuple(Path(model_dir) / f"{spec[side]}{VOCAB_SUFFIX}" for side in ("src", "tgt"))


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether ``a`` and ``b`` turn text into the same ids and back."""
    return (a.kind, a.lowercase, a.tokens, a.model_proto) == (b.kind, b.lowercase, b.tokens, b.model_proto)


def check_shared_tokenizers(model_dirs: Sequence[Path], tokenizers: Sequence[tuple[Tokenizer, Tokenizer]]
                            ) -> None:
    """Refuse members whose (source, target) tokenizers differ from the first member's, with a
    ConfigError naming the two files."""
    first = tokenizer_paths(model_dirs[0])
    for folder, pair in zip(model_dirs[1:], tokenizers[1:]):
        for side, (name, mine, theirs) in enumerate(zip(("source", "target"), pair, tokenizers[0])):
            if not same_tokenizer(mine, theirs):
                raise ConfigError(
                    f"ensemble: {tokenizer_paths(folder)[side]} and {first[side]} differ: the members "
                    f"of an ensemble must share the {name} tokenizer (they decode the same ids)")
