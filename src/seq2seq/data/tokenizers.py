"""Tokenizers: one side's text <-> token ids.

Three kinds share one class: ``sentencepiece`` (a subword model trained in-process, the
default), ``word`` (whitespace-separated words, the most frequent ``vocab_size`` kept) and
``char`` (every character, spaces included). All reserve the same special ids, so the model
never needs to know which kind made its inputs.

A trained tokenizer is saved as ``NAME.vocab.json`` (kind, lowercase flag, and the token list
for word/char or the model file's name for sentencepiece), plus ``NAME.model`` for
sentencepiece. ``tokenizer.json`` in the model folder names the source and target tokenizers.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm

from seq2seq.config import TOKENIZERS, ConfigError, DataConfig, quote
from seq2seq.data.text import DataError
from seq2seq.files import FileError, atomic_write_bytes, atomic_write_json, read_named_file, read_regular_file
from seq2seq.model_dir import TOKENIZER_FILE

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")
UNK_SURFACE = "\u2047"  # how decode shows <unk>, as sentencepiece does
_SKIP_ON_DECODE = frozenset((PAD_ID, BOS_ID, EOS_ID))
_SURROGATE = re.compile("[\ud800-\udfff]")  # lone surrogates cannot be encoded as UTF-8
_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # file stems we agree to load: no path separators
SPM_SEED = 1  # sentencepiece's sampling of training sentences


class Tokenizer:
    """One side's text <-> ids. ``kind``: 'sentencepiece' | 'word' | 'char'.

    Build one with ``train_tokenizers`` or ``Tokenizer.load``; ``tokens`` (word/char) lists the
    vocabulary with ``SPECIALS`` first, ``model_proto`` (sentencepiece) is the model's bytes.
    """

    def __init__(self, kind: str, lowercase: bool = False, tokens: Sequence[str] | None = None,
                 model_proto: bytes | None = None) -> None:
        self.kind, self.lowercase = kind, lowercase
        self.model_proto = model_proto
        if kind == "sentencepiece":
            self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
            self.tokens = [self._sp.id_to_piece(i) for i in range(len(self._sp))]
        else:
            self._sp = None
            self.tokens = list(tokens or SPECIALS)
        # Specials are left out of the lookup, so a literal "<pad>" in the text is just unknown.
        self._index = {t: i for i, t in enumerate(self.tokens) if i >= len(SPECIALS)}

    def _prepare(self, text: str) -> str:
        text = _SURROGATE.sub("\ufffd", text)
        return text.lower() if self.lowercase else text

    def pieces(self, text: str) -> list[str]:
        """The token strings of ``encode(text)``, as they appear in the text (plot labels)."""
        text = self._prepare(text)
        if self._sp is not None:
            return self._sp.encode(text, out_type=str)
        return text.split() if self.kind == "word" else list(text)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without bos/eos; anything unknown becomes ``UNK_ID``."""
        if self._sp is not None:
            return self._sp.encode(self._prepare(text))
        return [self._index.get(piece, UNK_ID) for piece in self.pieces(text)]

    def decode(self, ids: Sequence[int]) -> str:
        """Detokenized text of ``ids``; pad/bos/eos are skipped, <unk> shows as '⁇'."""
        ids = [int(i) for i in ids if int(i) not in _SKIP_ON_DECODE]
        bad = [i for i in ids if not 0 <= i < len(self)]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary of {len(self)}")
        if self._sp is not None:
            return self._sp.decode(ids)
        words = [UNK_SURFACE if i == UNK_ID else self.tokens[i] for i in ids]
        return (" " if self.kind == "word" else "").join(words)

    def id_to_piece(self, i: int) -> str:
        return self.tokens[i]

    def __len__(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, size={len(self)}, lowercase={self.lowercase})"

    def save(self, directory: Path, name: str) -> None:
        """Write ``NAME.vocab.json`` (and ``NAME.model`` for sentencepiece), each atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        spec: dict[str, Any] = {"kind": self.kind, "lowercase": self.lowercase}
        if self._sp is not None:
            atomic_write_bytes(directory / f"{name}.model", self.model_proto)
            spec.update(model=f"{name}.model", size=len(self))
        else:
            spec["tokens"] = self.tokens
        atomic_write_json(directory / f"{name}.vocab.json", spec)

    @classmethod
    def load(cls, directory: Path, name: str) -> Tokenizer:
        """Read what ``save`` wrote; a missing or tampered file is a DataError naming it."""
        path = Path(directory) / f"{name}.vocab.json"
        spec = _read_json(path, named_by=Path(directory) / TOKENIZER_FILE)  # a name from data
        kind = _field(spec, "kind", path, lambda v: v in TOKENIZERS, f"one of {TOKENIZERS}")
        lowercase = _field(spec, "lowercase", path, lambda v: isinstance(v, bool), "true or false")
        if kind != "sentencepiece":
            tokens = _field(spec, "tokens", path, lambda v: _valid_tokens(v, kind),
                            "a list of distinct strings starting with " + ", ".join(SPECIALS)
                            + (", one character each after them" if kind == "char" else ""))
            return cls(kind, lowercase, tokens=tokens)
        model = _field(spec, "model", path, lambda v: isinstance(v, str) and _NAME.fullmatch(v),
                       "a file name in the same folder")
        size = _field(spec, "size", path, lambda v: type(v) is int, "an integer")
        model_path = path.parent / model
        try:
            tokenizer = cls(kind, lowercase, model_proto=read_named_file(path.parent, model, path))
        except FileNotFoundError:
            raise DataError(f"{model_path}: no such file (named by {path})") from None
        except FileError as error:  # a link, a FIFO, a device, too big: it says which
            raise DataError(str(error)) from None
        except (RuntimeError, OSError, ValueError) as error:
            raise DataError(f"{model_path}: not a sentencepiece model (named by {path}): "
                             f"{error}") from None
        if tokenizer.tokens[:len(SPECIALS)] != list(SPECIALS) or len(tokenizer) != size:
            raise DataError(f"{model_path}: does not match {path} (field 'size' {size}, model has "
                             f"{len(tokenizer)} pieces starting {tokenizer.tokens[:4]})")
        return tokenizer


def _read_json(path: Path, named_by: Path | None = None) -> dict:
    """The JSON object in ``path``; a file named by data (``named_by``: the file that named it)
    is read as ``files.read_named_file`` reads: a regular file, never through a link."""
    try:
        data = (read_regular_file(path) if named_by is None
                else read_named_file(path.parent, path.name, named_by))
        value = json.loads(data.decode("utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: not valid JSON: {error}") from None
    except RecursionError:
        raise DataError(f"{path}: not valid JSON: nested too deeply") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _field(spec: dict, key: str, path: Path, check: Callable[[Any], Any], expected: str) -> Any:
    if key not in spec:
        raise DataError(f"{path}: field {key!r} is missing")
    if not check(spec[key]):
        raise DataError(f"{path}: field {key!r} must be {expected}, got {quote(spec[key])}")
    return spec[key]


def _valid_tokens(tokens: Any, kind: str) -> bool:
    return (isinstance(tokens, list) and all(isinstance(t, str) for t in tokens)
            and tuple(tokens[:len(SPECIALS)]) == SPECIALS and len(set(tokens)) == len(tokens)
            and (kind != "char" or all(len(t) == 1 for t in tokens[len(SPECIALS):])))


# -- training ---------------------------------------------------------------------------------
def train_tokenizers(config: DataConfig, src_lines: Sequence[str], tgt_lines: Sequence[str],
                     model_dir: Path, log: Callable[[str], None] = print) -> tuple[Tokenizer, Tokenizer]:
    """Train the source and target tokenizers on training text and save them in ``model_dir``.

    Sentencepiece trains one joint model on both sides when ``config.joint_vocab``, else one per
    side; word and char vocabularies are always per side.
    """
    model_dir = Path(model_dir)
    kind = config.tokenizer
    if kind == "sentencepiece" and config.joint_vocab:
        joint = _train(config, itertools.chain(src_lines, tgt_lines), "joint", log)
        pair, names = (joint, joint), ("joint", "joint")
    else:
        pair = (_train(config, src_lines, "source", log), _train(config, tgt_lines, "target", log))
        names = ("src", "tgt")
    for tokenizer, name in zip(pair, names):
        tokenizer.save(model_dir, name)
    atomic_write_json(model_dir / TOKENIZER_FILE, {"kind": kind, "src": names[0], "tgt": names[1]})
    return pair


def load_tokenizers(model_dir: Path) -> tuple[Tokenizer, Tokenizer]:
    """The (source, target) tokenizers that ``train_tokenizers`` saved in ``model_dir``."""
    path = Path(model_dir) / TOKENIZER_FILE
    spec = _read_json(path)
    names = [_field(spec, side, path, lambda v: isinstance(v, str) and _NAME.fullmatch(v),
                    "a file stem such as 'src' or 'joint'") for side in ("src", "tgt")]
    src = Tokenizer.load(path.parent, names[0])
    return src, src if names[1] == names[0] else Tokenizer.load(path.parent, names[1])


def _train(config: DataConfig, lines: Iterable[str], side: str, log: Callable[[str], None]) -> Tokenizer:
    lowercase = config.lowercase
    texts = (t for t in (_SURROGATE.sub("\ufffd", line) for line in lines) if t.strip())
    if lowercase:
        texts = (t.lower() for t in texts)
    if config.tokenizer == "sentencepiece":
        tokenizer = Tokenizer("sentencepiece", lowercase, model_proto=_train_sentencepiece(
            texts, config.vocab_size, side, config.tokenizer_sample))
        log(f"sentencepiece {side} vocabulary: {len(tokenizer)} pieces")
        return tokenizer
    word = config.tokenizer == "word"
    counts = Counter(itertools.chain.from_iterable(t.split() if word else t for t in texts))
    for special in SPECIALS:
        counts.pop(special, None)
    ranked = sorted(counts, key=lambda t: (-counts[t], t))  # most frequent first, ties by text
    kept = ranked[:max(config.vocab_size - len(SPECIALS), 0)] if word else ranked
    total = sum(counts.values()) or 1
    coverage = sum(counts[t] for t in kept) / total
    log(f"{config.tokenizer} {side} vocabulary: {len(kept) + len(SPECIALS)} tokens of "
        f"{len(ranked)} types seen + specials, covering {coverage:.1%} of the training tokens")
    return Tokenizer(config.tokenizer, lowercase, tokens=[*SPECIALS, *kept])


def _train_sentencepiece(texts: Iterable[str], vocab_size: int, side: str, sample: int) -> bytes:
    """A unigram model of ``texts``, as serialized bytes; deterministic for the same input.
    Sentencepiece keeps at most ``sample`` sentences of them (``data.tokenizer_sample``; it
    refuses a sample of 100 or fewer, so a smaller one keeps 101)."""
    texts = iter(texts)
    first = next(texts, None)
    if first is None:
        raise DataError(f"cannot train a {side} tokenizer: the training text has no non-empty line")
    spm.set_random_generator_seed(SPM_SEED)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=itertools.chain([first], texts), model_writer=model,
            model_type="unigram", vocab_size=vocab_size, hard_vocab_limit=False,
            character_coverage=1.0, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            pad_piece=SPECIALS[0], unk_piece=SPECIALS[1], bos_piece=SPECIALS[2], eos_piece=SPECIALS[3],
            input_sentence_size=max(sample, 101), shuffle_input_sentence=True,
            num_threads=os.cpu_count() or 1, minloglevel=2)
    except RuntimeError as error:
        needed = re.search(r"required_chars\. \d+ vs (\d+)", str(error))
        if needed:
            raise ConfigError(f"data.vocab_size={vocab_size} is too small for the {side} text: its "
                             f"characters and the specials need at least {needed.group(1)}") from None
        raise DataError(f"sentencepiece could not train the {side} tokenizer: {error}") from None
    return model.getvalue()
