"""The translation API: a trained model with its tokenizers, loaded once, used many times.

    translator = Translator.load("runs/en_de")  # trained by `seq2seq train` or seq2seq.train_translator
    translator.translate(["A man rides a bike."], beam=5)
    translator.evaluate("test.en", "test.de")
    translator.plot_attention("A man rides a bike.", "attention.png")
    Translator.load_ensemble(["runs/a", "runs/b"]).translate(["A man rides a bike."])  # several models
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seq2seq.config import Config, ConfigError, DataConfig, decode_settings
from seq2seq.data.text import DataError, read_lines
from seq2seq.data.tokenizers import PAD_ID, Tokenizer, load_tokenizers
from seq2seq.decoding.decode import decode_ids, encode_source
from seq2seq.decoding.ensemble import Ensemble, check_shared_tokenizers
from seq2seq.decoding.scores import score_translations
from seq2seq.decoding.search import Hypothesis
from seq2seq.device import resolve_device, resolve_precision
from seq2seq.kernels import apply as kernels_apply
from seq2seq.kernels import decoding_session
from seq2seq.model_dir import AVERAGED, BEST, CONFIG_FILE, LAST
from seq2seq.models.builder import build_model
from seq2seq.models.checkpoint import CheckpointError, check_shapes, load_model
from seq2seq.models.rnn.model import Seq2Seq
from seq2seq.models.transformer.model import Transformer

CHUNK_LINES = 1000  # sentences per chunk of hypothesis_chunks: sorted by length within each


CHECKPOINTS = {"best": BEST, "last": LAST, "averaged": AVERAGED}  # --checkpoint: the file it loads

class Translator:
    """A translation model, its tokenizers and its decoding settings."""

    def __init__(self, model: Seq2Seq, src_tok: Tokenizer, tgt_tok: Tokenizer, config: Config,
                 device: torch.device | None = None) -> None:
        self.config = config
        self.src_tok, self.tgt_tok = src_tok, tgt_tok
        self.device = device or next(model.parameters()).device
        self.model = model.to(self.device).eval()

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def load(cls, model_dir: str | Path, checkpoint: str = "best", device: str = "auto",
             quantize: bool | None = None, precision: str | None = None,
             kernels: str | None = None) -> Translator:
        """Load ``best`` (or ``last``) weights, config and tokenizers from a model directory.

        ``precision`` ('auto', 'fp32' or 'bf16'; default: the config's ``decode.precision``,
        fp32 unless set; 'auto' as ``seq2seq.device.resolve_precision``): bf16 runs an RNN's
        output-layer product in bf16 on a CPU and autocasts the model elsewhere (the
        Transformer on a CPU too). Its speed is in ``benchmarks/RESULTS.md``.
        ``quantize`` (default: the config's ``decode.quantize``) applies int8 dynamic
        quantization to the linear layers for CPU decoding, in this process only: the model
        directory keeps its float32 weights, and a quantized model is not saved. It runs on
        ``torch.ao.quantization.quantize_dynamic``, which PyTorch deprecates in favour of the
        separate torchao package and plans to delete once its blockers are cleared (planned
        first for 2.10; still present and working in 2.13 and 2.14); where it is gone,
        ``quantize`` is refused with a ConfigError that says so. ``kernels`` ('fast' or
        'reference'; default: the config's ``train.kernels``): see ``seq2seq.kernels.policy``.
        """
        model_dir = Path(model_dir)
        config_path = model_dir / CONFIG_FILE
        if not os.path.lexists(config_path):  # present but not a regular file: Config.load says so
            raise CheckpointError(f"{model_dir}: not a model directory (no {CONFIG_FILE})")
        config = Config.load(config_path)
        src_tok, tgt_tok = load_tokenizers(model_dir)
        if checkpoint not in CHECKPOINTS:
            raise ConfigError(f"checkpoint must be 'best', 'last' or 'averaged', got {checkpoint!r}")
        weights = model_dir / CHECKPOINTS[checkpoint]
        if checkpoint == "best" and not os.path.lexists(weights):
            weights = model_dir / LAST
        sizes = config.model, len(src_tok), len(tgt_tok), PAD_ID
        try:  # shapes only: a tampered config (hidden_size: 10**9) is refused, not allocated
            skeleton = build_model(*sizes, meta=True)
        except (RuntimeError, ValueError) as error:  # sizes past int64, impossible settings
            raise ConfigError(f"{config_path}: cannot build the model it describes: {error}") from None
        check_shapes(weights, skeleton)  # before any allocation
        with torch.random.fork_rng(devices=[]):  # the initial weights, replaced next, draw nothing
            model = build_model(*sizes)
        load_model(weights, model)
        translator = cls(model, src_tok, tgt_tok, config, resolve_device(device))
        if quantize is not None:
            config.decode.quantize = quantize
        if precision is not None:
            config.set("decode.precision", precision, source="precision")
        if kernels is not None:
            config.set("train.kernels", kernels, source="kernels")
        config.validate()
        config.decode.precision = resolve_precision(config.decode.precision, translator.device)
        if config.decode.quantize and translator.device.type == "cpu":
            translator.model = _quantized(translator.model)
        kernels_apply(translator.model, config.train.kernels, translator.device,
                      config.decode.precision)
        check_attention_choice(translator)
        return translator

    @classmethod
    def load_ensemble(cls, model_dirs: Sequence[str | Path], weights: Sequence[float] | None = None,
                      checkpoint: str = "best", device: str = "auto", quantize: bool | None = None,
                      precision: str | None = None, kernels: str | None = None) -> Translator:
        """Several models decoding as one (``decoding.ensemble``): at each step, the weighted
        mean of their log-probabilities (``weights``: one per model, default equal).

        Each member loads as ``load`` loads it, with the same arguments; they must share the
        source and target tokenizers (else a ConfigError naming the two files), and decode in
        one precision (``precision``, default the first member's ``decode.precision``); bf16 on a
        CPU rounds an RNN's output scores, which an ensemble cannot average: refused there. Decoding settings
        (``decode``) are the first member's. The translator's ``model`` is an ``Ensemble``;
        ``model_dirs`` lists the folders.
        """
        model_dirs = [Path(d) for d in model_dirs]
        if not model_dirs:
            raise ConfigError("an ensemble needs at least one model directory")
        members: list[Translator] = []
        for folder in model_dirs:
            members.append(cls.load(folder, checkpoint, device, quantize, precision, kernels))
            precision = members[0].config.decode.precision  # the first member's, for all of them
        check_shared_tokenizers(model_dirs, [(m.src_tok, m.tgt_tok) for m in members])
        ensemble = Ensemble([m.model for m in members], weights)
        ensemble.eval().session()  # refuses members that would round their scores, before any work
        first = members[0]
        translator = cls(ensemble, first.src_tok, first.tgt_tok, first.config, first.device)
        translator.model_dirs = model_dirs
        return translator

    # -- translation -----------------------------------------------------------------------
    def translate(self, sentences: Iterable[str], beam: int | None = None,
                  n_best: int = 1, batch_size: int | None = None,
                  source: str = "input") -> list[str] | list[list[str]]:
        """Translate sentences; returns one string each, or ``n_best`` strings each if n_best > 1.

        ``source`` names the sentences in errors (a file name): see ``encode_source``.
        """
        results = self.hypotheses(sentences, beam=beam, n_best=n_best, batch_size=batch_size,
                                  source=source)
        texts = [[self.tgt_tok.decode(h.tokens) for h in hyps] for hyps in results]
        return [t[0] for t in texts] if n_best == 1 else texts

    def hypotheses(self, sentences: Iterable[str], beam: int | None = None, n_best: int = 1,
                   batch_size: int | None = None, return_attention: bool = False,
                   source: str = "input") -> list[list[Hypothesis]]:
        """Decode in batches of similar length; results come back in input order.

        A sentence with no tokens (empty or blank) is not decoded: its hypotheses are empty,
        with score 0, as Sockeye does; what a model makes of a lone eos is arbitrary."""
        if isinstance(sentences, str | bytes):
            raise TypeError("translate() takes a list of sentences, not one string")
        src_ids = [self.encode_source(s, f"{source}:{n}") for n, s in enumerate(sentences, start=1)]
        return self.decode_ids(src_ids, beam=beam, n_best=n_best, batch_size=batch_size,
                               return_attention=return_attention, source=source)

    def hypothesis_chunks(self, sentences: Iterable[str], beam: int | None = None, n_best: int = 1,
                          batch_size: int | None = None, source: str = "input",
                          chunk_lines: int = CHUNK_LINES) -> Iterator[list[list[Hypothesis]]]:
        """``hypotheses`` of ``sentences`` taken ``chunk_lines`` at a time: each chunk is read,
        decoded (in batches of similar length) and given back in input order before the next
        is read, so memory stays flat however many sentences come (an endless pipe)."""
        if isinstance(sentences, str | bytes):
            raise TypeError("hypothesis_chunks() takes sentences, not one string")
        settings = decode_settings(self.config.decode, beam=beam, n_best=n_best, batch_size=batch_size)
        sentences, first = iter(sentences), 1
        while chunk := list(itertools.islice(sentences, chunk_lines)):
            src_ids = [self.encode_source(s, f"{source}:{n}") for n, s in enumerate(chunk, start=first)]
            yield decode_ids(self.model, src_ids, settings, self.device, self.config.decode.precision,
                             source=source, first_line=first)
            first += len(chunk)

    def decode_ids(self, src_ids: Sequence[list[int]], beam: int | None = None, n_best: int = 1,
                   batch_size: int | None = None, return_attention: bool = False,
                   source: str = "input",
                   should_stop: Callable[[], bool] | None = None) -> list[list[Hypothesis]]:
        """``hypotheses`` of sentences already encoded by ``encode_source`` (ids ending in eos),
        for a caller that needed the ids first (the server checks their length per request).
        ``should_stop``: see ``decode.decode_ids`` (the server's deadlines)."""
        settings = decode_settings(self.config.decode, beam=beam, n_best=n_best, batch_size=batch_size)
        return decode_ids(self.model, src_ids, settings, self.device, self.config.decode.precision,
                          return_attention=return_attention, source=source, should_stop=should_stop)

    def encode_source(self, sentence: str, where: str = "input") -> list[int]:
        """Source ids with eos, at most ``decode.max_input_len`` tokens before it: a longer
        sentence is cut (``data.long_pairs: truncate``) or refused with a DataError naming
        ``where`` (``skip``); see ``decode.encode_source``."""
        return encode_source(sentence, self.src_tok, self.config.decode.max_input_len,
                             self.config.data.long_pairs, where)

    # -- evaluation ------------------------------------------------------------------------
    def evaluate(self, src: Sequence[str] | str | Path, ref: Sequence[str] | str | Path,
                 beam: int | None = None, lowercase: bool = False) -> dict[str, Any]:
        """sacreBLEU BLEU and chrF of the translations of ``src`` against ``ref`` (lists or files)."""
        sources, references = _evaluation_lines(src, ref, self.config.data)
        start = time.perf_counter()
        hypotheses = self.translate(sources, beam=beam)
        seconds = time.perf_counter() - start
        scores = score_translations(hypotheses, references, lowercase=lowercase)
        return {**scores, "beam": beam or self.config.decode.beam, "sentences": len(sources),
                "seconds": round(seconds, 3),
                "sentences_per_s": round(len(sources) / max(seconds, 1e-9), 2)}

    # -- attention -------------------------------------------------------------------------
    def attention(self, text: str, beam: int = 1) -> Alignment:
        """Translate one sentence and return its attention weights with the token labels."""
        if not _has_attention(self.model):
            raise ConfigError("this model has no attention (model.attention is none)")
        hyp = self.hypotheses([text], beam=beam, return_attention=True)[0][0]
        src_pieces = self.src_tok.pieces(text)[: self.config.decode.max_input_len] + ["</s>"]
        tgt_pieces = [self.tgt_tok.id_to_piece(i) for i in hyp.tokens] + ["</s>"]
        weights = hyp.attention.float().numpy()[: len(tgt_pieces), : len(src_pieces)]
        return Alignment(weights, src_pieces, tgt_pieces, self.tgt_tok.decode(hyp.tokens))

    def plot_attention(self, text: str, path: str | Path, beam: int = 1) -> Path:
        """Write a heatmap PNG of source pieces against target pieces."""
        from seq2seq.plot import plot_attention  # here: matplotlib is not loaded for --help or import

        alignment = self.attention(text, beam=beam)
        return plot_attention(alignment.weights, alignment.source_pieces, alignment.target_pieces,
                              path, title=f"{text}  →  {alignment.translation}")


def check_attention_choice(translator: Translator) -> None:
    """Refuse ``decode.attention_layer`` or ``attention_head`` outside a Transformer's layers or
    heads (each member's, for an ensemble), naming the setting, before any decoding: the
    bounds are its decoding session's."""
    decode = translator.config.decode
    members = translator.model.members if isinstance(translator.model, Ensemble) else [translator.model]
    for model in members:
        if isinstance(model, Transformer):
            try:
                decoding_session(model, decode.attention_layer, decode.attention_head)
            except ValueError as error:
                raise ConfigError(f"decode.{error}") from None


def _has_attention(model: torch.nn.Module) -> bool:
    """Whether ``model`` (an ``Ensemble``: any member) computes attention weights."""
    members = model.members if isinstance(model, Ensemble) else [model]
    return any(getattr(getattr(m, "config", None), "attention", True) is not None for m in members)


def _quantized(model: Seq2Seq) -> Seq2Seq:
    """``model`` with int8 dynamic quantization of its linear layers, for CPU decoding."""
    quantize_dynamic = getattr(getattr(torch.ao, "quantization", None), "quantize_dynamic", None)
    if quantize_dynamic is None:
        raise ConfigError(f"quantize: this torch ({torch.__version__}) no longer has "
                          "torch.ao.quantization.quantize_dynamic; decode without --quantize")
    return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def _evaluation_lines(src: Sequence[str] | str | Path, ref: Sequence[str] | str | Path,
                      data: DataConfig) -> tuple[list[str], list[str]]:
    """``evaluate``'s sources and references, read (files within ``data``'s limits) and checked."""
    limits = data.max_line_chars, data.max_lines
    sources = read_lines(src, *limits) if isinstance(src, str | Path) else list(src)
    references = read_lines(ref, *limits) if isinstance(ref, str | Path) else list(ref)
    src_name = src if isinstance(src, str | Path) else "the source list"
    ref_name = ref if isinstance(ref, str | Path) else "the reference list"
    for name, lines in ((src_name, sources), (ref_name, references)):
        if not lines:
            raise DataError(f"{name}: no lines to evaluate")
    if not all(isinstance(line, str) for line in references):
        raise TypeError(f"{ref_name}: references must be strings")
    if len(sources) != len(references):
        raise DataError(f"sources and references differ in length: {src_name} has "
                         f"{len(sources)} lines, {ref_name} has {len(references)}")
    return sources, references


@dataclass
class Alignment:
    """weights: (len(target_pieces), len(source_pieces)), eos row and column included."""

    weights: np.ndarray
    source_pieces: list[str]
    target_pieces: list[str]
    translation: str
