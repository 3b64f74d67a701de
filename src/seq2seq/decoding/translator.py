"""The translation API: a trained model with its tokenizers, loaded once, used many times.

    translator = Translator.train("configs/multi30k_en_de.yaml", "runs/en_de", data_dir=...)
    translator = Translator.load("runs/en_de")
    translator.translate(["A man rides a bike."], beam=5)
    translator.evaluate("test.en", "test.de")
    translator.plot_attention("A man rides a bike.", "attention.png")
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seq2seq.config import Config, ConfigError, DataConfig, decode_settings
from seq2seq.data.batches import collate
from seq2seq.data.text import read_lines
from seq2seq.data.tokenizers import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, load_tokenizers
from seq2seq.decoding.scores import score_translations
from seq2seq.decoding.search import Hypothesis, beam_search, greedy_search, max_output_lengths
from seq2seq.device import resolve_device
from seq2seq.kernels.ops import precision_autocast
from seq2seq.model_dir import BEST, CONFIG_FILE, LAST
from seq2seq.models.checkpoint import CheckpointError, check_shapes, load_model, shapes_only
from seq2seq.models.rnn.model import DecodingSession, Seq2Seq
from seq2seq.training import loop as training
from seq2seq.training.setup import build_model, refuse_own_config


def _skeleton(config: Config, src_tok: Tokenizer, tgt_tok: Tokenizer) -> Seq2Seq:
    """The model a config describes, without memory, so that a tampered config (say
    hidden_size: 10**9) is refused by ``check_shapes``, not allocated."""
    with shapes_only():
        return build_model(config, src_tok, tgt_tok)


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
    def train(cls, config: Config | str | Path, model_dir: str | Path,
              data_dir: str | Path | None = None, resume: bool = False,
              overrides: Sequence[str] = (), overwrite: bool = False) -> Translator:
        """Train a model into ``model_dir`` (see ``seq2seq.training.loop``) and load its best checkpoint.

        The config's data paths are relative to ``data_dir`` (default: the current directory,
        as for ``seq2seq train``). A trained model already in ``model_dir`` is an error unless
        ``resume`` (go on training it) or ``overwrite`` (replace it).
        """
        if not isinstance(config, Config):
            if not resume:
                refuse_own_config(Path(config), Path(model_dir))
            config = Config.load(config)
        config.override(list(overrides))
        training.train(config, Path(model_dir), data_dir=data_dir, resume=resume,
                       overwrite=overwrite, translator=cls)
        return cls.load(model_dir)

    @classmethod
    def load(cls, model_dir: str | Path, checkpoint: str = "best", device: str = "auto",
             quantize: bool | None = None, precision: str | None = None,
             kernels: str | None = None) -> Translator:
        """Load ``best`` (or ``last``) weights, config and tokenizers from a model directory.

        ``precision`` ('fp32' or 'bf16'; default: the config's ``train.precision``): bf16
        runs the output layer's product in bf16 on CPU (1.2x the sentences/s of beam 5 on
        CPUs with AVX-512 BF16 or AMX) and autocasts the model on a GPU.
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
        if checkpoint not in ("best", "last"):
            raise ValueError(f"checkpoint must be 'best' or 'last', got {checkpoint!r}")
        weights = model_dir / (BEST if checkpoint == "best" else LAST)
        if checkpoint == "best" and not os.path.lexists(weights):
            weights = model_dir / LAST
        try:
            skeleton = _skeleton(config, src_tok, tgt_tok)
        except (RuntimeError, ValueError) as error:  # sizes past int64, impossible settings
            raise ConfigError(f"{config_path}: cannot build the model it describes: {error}") from None
        check_shapes(weights, skeleton)  # before any allocation
        model = build_model(config, src_tok, tgt_tok)
        load_model(weights, model)
        translator = cls(model, src_tok, tgt_tok, config, resolve_device(device))
        if quantize is not None:
            config.decode.quantize = quantize
        if precision is not None:
            config.set("train.precision", precision, source="precision")
        if kernels is not None:
            config.set("train.kernels", kernels, source="kernels")
        config.validate()
        if config.decode.quantize and translator.device.type == "cpu":
            translator.model = _quantized(translator.model)
        translator.model.set_fast_paths(config.train.kernels, translator.device,
                                        config.train.precision)
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

    def decode_ids(self, src_ids: Sequence[list[int]], beam: int | None = None, n_best: int = 1,
                   batch_size: int | None = None, return_attention: bool = False,
                   source: str = "input") -> list[list[Hypothesis]]:
        """``hypotheses`` of sentences already encoded by ``encode_source`` (ids ending in eos),
        for a caller that needed the ids first (the server checks their length per request)."""
        decode = decode_settings(self.config.decode, beam=beam, n_best=n_best, batch_size=batch_size)
        beam, n_best, batch_size = decode.beam, decode.n_best, decode.batch_size
        if beam > 1:  # beam search decodes batch * beam rows: keep about 2 * batch_size of them
            batch_size = max(1, 2 * batch_size // beam)
        banned = [PAD_ID, BOS_ID] + ([UNK_ID] if decode.ban_unk else [])
        results: list[list[Hypothesis]] = [[] for _ in src_ids]
        for i, ids in enumerate(src_ids):
            if len(ids) == 1:  # eos alone; its eos step attends to it alone
                results[i] = [Hypothesis([], 0.0, torch.ones(1, 1) if return_attention else None)
                              for _ in range(n_best)]
        order = sorted((i for i, ids in enumerate(src_ids) if len(ids) > 1),
                       key=lambda i: len(src_ids[i]))
        expected_rows = beam * sum(len(src_ids[i]) for i in order)  # target ~ source length
        session = DecodingSession(self.model, expected_rows)  # this call's, for all its batches
        with torch.inference_mode(), self._autocast():
            for start in range(0, len(order), batch_size):
                indices = order[start:start + batch_size]
                batch = collate(indices, src_ids).to(self.device)
                limits = max_output_lengths(batch.src_lengths, decode.max_len_ratio)
                if beam == 1:
                    found = [[h] for h in greedy_search(
                        self.model, batch.src, batch.src_lengths, bos=BOS_ID, eos=EOS_ID,
                        max_lengths=limits, banned=banned, return_attention=return_attention,
                        session=session)]
                else:
                    found = beam_search(
                        self.model, batch.src, batch.src_lengths, beam=beam, bos=BOS_ID,
                        eos=EOS_ID, max_lengths=limits, alpha=decode.length_penalty,
                        n_best=n_best, banned=banned, return_attention=return_attention,
                        session=session)
                for index, hyps in zip(indices, found):
                    if not hyps or any(math.isnan(h.score) for h in hyps):  # NaN: none could win
                        raise ValueError(f"{source}:{index + 1}: the model's scores are not finite "
                                         f"(NaN or infinite weights or activations)")
                    results[index] = hyps
        return results

    def encode_source(self, sentence: str, where: str = "input") -> list[int]:
        """Source ids with eos, at most ``decode.max_input_len`` tokens before it.

        Decoding time grows with the square of the length (every output step attends to every
        source token, and the output may be 1.5 times as long), so a longer sentence is cut
        (``data.long_pairs: truncate``) or refused with a ValueError naming ``where`` (``skip``).
        """
        if not isinstance(sentence, str):
            raise TypeError(f"{where}: expected a string, got {type(sentence).__name__}")
        ids = self.src_tok.encode(sentence)
        limit = self.config.decode.max_input_len
        if len(ids) > limit:
            if self.config.data.long_pairs != "truncate":
                raise ValueError(f"{where}: {len(ids)} tokens, more than decode.max_input_len="
                                 f"{limit}; raise it, or set data.long_pairs to 'truncate' to "
                                 f"translate the first {limit} tokens of such lines (in the "
                                 f"model's {CONFIG_FILE})")
            ids = ids[:limit]
        return ids + [EOS_ID]

    def _autocast(self):
        """Autocast for the model's precision (``ops.precision_autocast``); off otherwise, even
        inside a caller's autocast."""
        return precision_autocast(self.config.train.precision, self.device.type)

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
        if self.model.config.attention is None:
            raise ValueError("this model has no attention (model.attention is none)")
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
            raise ValueError(f"{name}: no lines to evaluate")
    if not all(isinstance(line, str) for line in references):
        raise TypeError(f"{ref_name}: references must be strings")
    if len(sources) != len(references):
        raise ValueError(f"sources and references differ in length: {src_name} has "
                         f"{len(sources)} lines, {ref_name} has {len(references)}")
    return sources, references


@dataclass
class Alignment:
    """weights: (len(target_pieces), len(source_pieces)), eos row and column included."""

    weights: np.ndarray
    source_pieces: list[str]
    target_pieces: list[str]
    translation: str
