"""Settings: one dataclass per section, read by YAML files, CLI flags and the Python API.

A config file has the sections ``data``, ``model``, ``train`` and ``decode``; every key is a
field below. ``--set train.lr=0.0005`` on the command line and ``Config.override`` in Python
go through the same checks, so an unknown or mistyped key is an error that names it.
"""

from __future__ import annotations

import dataclasses
import math
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from seq2seq.files import atomic_write_text, read_regular_file

CELLS = ("rnn", "gru", "lstm")
ATTENTIONS = ("bahdanau", "dot", "general")
ATTENTION_ALIASES = {"luong": "general", "none": None, "": None}
TOKENIZERS = ("sentencepiece", "word", "char")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = re.compile(r"auto|cpu|cuda(:\d{1,4})?")
# Upper bounds: a model of 10,000 layers takes a minute to refuse, even with no memory behind it;
# ints past C's ranges crash inside the libraries. Wide enough for any real run.
MAX_INT = 2**62
MAX_LAYERS = 64
MAX_BEAM = 1000
MAX_LINE_CHARS = 100_000_000
MAX_LEN_RATIO = 100.0
MAX_THREADS = 4096
# The random generators' range: torch seeds every micro-batch with seed * 1_000_003 + its index,
# which must stay within 64 bits, and NumPy's legacy seeds are 32-bit.
MAX_SEED = 2**32 - 1
# sentencepiece reads its vocabulary size as a 32-bit int (and a bigger one fails inside it).
MAX_VOCAB = 2**31 - 1


class ConfigError(ValueError):
    """A setting that is unknown, of the wrong type or out of range."""


def normalize_attention(name: str | None) -> str | None:
    """'luong' means Luong's 'general' score; None or 'none' means no attention."""
    if name is None:
        return None
    key = name.lower() if isinstance(name, str) else None
    if key in ATTENTION_ALIASES:
        return ATTENTION_ALIASES[key]
    if key not in ATTENTIONS:
        raise ConfigError(
            f"unknown attention {quote(name)}: expected one of None, 'bahdanau', 'luong', "
            f"'dot', 'general'"
        )
    return key


@dataclass
class DataConfig:
    """Where the parallel text is and how it becomes token ids.

    Relative paths are relative to ``--data-dir`` (``data_dir=`` in Python), or to the current
    directory when none is given, never to the config file's folder: a packaged config lives
    inside the installed package. A source path ending in ``.tsv`` with no target path is
    read as one tab-separated file of pairs.
    """

    train_src: str = ""
    train_tgt: str = ""
    valid_src: str = ""
    valid_tgt: str = ""
    test_src: str = ""
    test_tgt: str = ""
    src_lang: str = "src"
    tgt_lang: str = "tgt"
    tokenizer: str = "sentencepiece"  # sentencepiece | word | char
    vocab_size: int = 8000  # subword vocabulary size (per side, or joint)
    joint_vocab: bool = True  # one sentencepiece model for both languages
    lowercase: bool = False
    max_len: int = 100  # tokens per side; longer training pairs are skipped or truncated
    long_pairs: str = "skip"  # skip | truncate
    max_line_chars: int = 100_000  # lines longer than this are refused with an error
    max_lines: int = 100_000_000  # a file (or stdin) with more lines is refused: memory is bounded
    tokenizer_sample: int = 1_000_000  # sentences (sampled reproducibly) each tokenizer learns from
    # Prepared training data (``seq2seq prepare``); empty: train prepares it in the model folder
    prepared: str = ""

    def validate(self) -> None:
        if self.tokenizer not in TOKENIZERS:
            raise ConfigError(f"data.tokenizer must be one of {TOKENIZERS}, got {quote(self.tokenizer)}")
        if self.long_pairs not in ("skip", "truncate"):
            raise ConfigError(f"data.long_pairs must be 'skip' or 'truncate', got "
                              f"{quote(self.long_pairs)}")
        _positive("data.max_len", self.max_len)
        _positive("data.vocab_size", self.vocab_size)
        _at_most("data.vocab_size", self.vocab_size, MAX_VOCAB, "2**31 - 1, the most a tokenizer takes")
        _positive("data.max_line_chars", self.max_line_chars)
        _at_most("data.max_line_chars", self.max_line_chars, MAX_LINE_CHARS)
        _positive("data.max_lines", self.max_lines)
        _positive("data.tokenizer_sample", self.tokenizer_sample)


@dataclass
class ModelConfig:
    """The architecture of the encoder-decoder: ``arch`` picks the family; each family reads
    the shared keys and its own (``ARCH_KEYS``). A key of the other family set away from its
    default is an error that names it."""

    cell: str = "gru"  # rnn | gru | lstm
    embed_size: int = 256
    hidden_size: int = 256  # the decoder's state size; per direction in the encoder unless...
    encoder_hidden_size: int = 0  # ...this is set: the encoder's, per direction (0: hidden_size)
    encoder_layers: int = 1
    decoder_layers: int = 1
    bidirectional: bool = True
    attention: str | None = "bahdanau"  # bahdanau | dot | general (luong) | none
    attention_size: int = 0  # Bahdanau's hidden layer; 0 means hidden_size
    input_feeding: bool = True  # feed the last attentional vector into the next step
    dropout: float = 0.2
    tie_embeddings: bool = True  # target embedding shared with the output layer
    arch: str = "rnn"  # rnn | transformer; ARCH_KEYS says which keys each family reads
    d_model: int = 256  # embedding and residual width
    heads: int = 4  # attention heads; d_model must be divisible by heads
    ff_size: int = 1024  # feed-forward hidden width
    attention_dropout: float = 0.0  # dropout on attention weights
    norm: str = "pre"  # pre | post: layer norm before each block (pre) or after the residual (post)
    positions: str = "sinusoidal"  # sinusoidal | learned
    max_positions: int = 1024  # learned positions: the longest sequence; sinusoidal: any length
    share_embeddings: bool = False  # one table for source and target (needs a joint vocabulary)

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise ConfigError(f"model.arch must be one of {ARCHS}, got {quote(self.arch)}")
        self._check_arch_keys()
        if self.cell not in CELLS:
            raise ConfigError(f"model.cell must be one of {CELLS}, got {quote(self.cell)}")
        self.attention = normalize_attention(self.attention)
        for name in ("embed_size", "hidden_size", "encoder_layers", "decoder_layers", "d_model",
                     "heads", "ff_size", "max_positions"):
            _positive(f"model.{name}", getattr(self, name))
        for name in ("encoder_layers", "decoder_layers"):
            _at_most(f"model.{name}", getattr(self, name), MAX_LAYERS)
        _non_negative("model.attention_size", self.attention_size)
        _non_negative("model.encoder_hidden_size", self.encoder_hidden_size)
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.d_model % self.heads:
            raise ConfigError(f"model.d_model ({self.d_model}) must be divisible by model.heads "
                              f"({self.heads})")
        if self.norm not in NORMS:
            raise ConfigError(f"model.norm must be one of {NORMS}, got {quote(self.norm)}")
        if self.positions not in POSITIONS:
            raise ConfigError(f"model.positions must be one of {POSITIONS}, got {quote(self.positions)}")

    def _check_arch_keys(self) -> None:
        """A key that only the other family reads, set away from its default, is an error (a
        saved config.yaml lists every key, at its default where unused)."""
        defaults = ModelConfig.__new__(ModelConfig)
        for item in dataclasses.fields(ModelConfig):
            setattr(defaults, item.name, item.default)
        for arch, keys in ARCH_KEYS.items():
            if arch == self.arch:
                continue
            for key in keys:
                if getattr(self, key) != getattr(defaults, key) and not (
                        key == "attention" and normalize_attention(self.attention) == defaults.attention):
                    raise ConfigError(f"model.{key} is a setting of model.arch={arch}, not of "
                                      f"model.arch={self.arch}; remove it")


ARCHS = ("rnn", "transformer")
NORMS = ("pre", "post")
POSITIONS = ("sinusoidal", "learned")
# The keys only one family reads; the others (layers, dropout, tie_embeddings) are shared.
ARCH_KEYS = {
    "rnn": ("cell", "embed_size", "hidden_size", "encoder_hidden_size", "bidirectional", "attention",
            "attention_size", "input_feeding"),
    "transformer": ("d_model", "heads", "ff_size", "attention_dropout", "norm", "positions",
                    "max_positions", "share_embeddings"),
}


@dataclass
class TrainConfig:
    """Optimisation, budget, checkpoints and validation."""

    seed: int = 1
    batch_tokens: int = 2000  # target tokens per batch (per process), padding excluded
    max_sentences: int = 256  # cap on sentences per batch
    accumulate: int = 1  # gradient accumulation steps per update
    epochs: int = 30
    max_minutes: float = 0.0  # 0 means no time budget
    max_steps: int = 0  # 0 means no step budget
    lr: float = 1e-3
    warmup_steps: int = 0  # linear warm-up
    schedule: str = "plateau"  # plateau (drops on stalls) | inverse_sqrt (lr * sqrt(warmup / step))
    plateau_factor: float = 0.5  # multiply the lr by this when validation BLEU stalls
    plateau_patience: int = 1  # validations without improvement before the lr drops
    min_lr: float = 1e-5
    clip_grad: float = 1.0  # max gradient norm, 0 for none
    label_smoothing: float = 0.1
    sampling_ratio: float = 0.0  # scheduled sampling: share of steps fed the model's prediction
    patience: int = 5  # early stopping: validations without a better BLEU
    valid_every: int = 0  # steps between validations; 0 means once per epoch
    valid_beam: int = 1  # beam for validation BLEU (1 = greedy, fast)
    log_every: int = 50  # steps between metrics.jsonl lines
    max_bad_steps: int = 5  # NaN/inf losses in a row before the run stops
    threads: int = 0  # torch threads on CPU; 0 means cores divided by processes per node
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # auto | fp32 | bf16. auto is bf16 on a CPU with native BF16 (avx512_bf16 or amx_bf16), fp32
    # elsewhere, decided when a run starts (seq2seq.device.resolve_precision). bf16 autocasts the
    # Transformer, and the RNN on a GPU; on a CPU the RNN's bf16 is its output layer's products.
    precision: str = "auto"
    kernels: str = "fast"  # fast | reference (plain PyTorch only): see seq2seq/kernels/policy.py
    backend: str = "auto"  # torch.distributed backend: auto | gloo | nccl
    keep_checkpoints: int = 0  # keep the weights of the last N saves for `seq2seq average`
    checkpoint_delay_s: float = 0.0  # test hook: sleep while a checkpoint is half written

    def validate(self) -> None:
        for name in ("batch_tokens", "max_sentences", "accumulate", "epochs", "log_every",
                     "valid_beam", "plateau_patience"):
            _positive(f"train.{name}", getattr(self, name))
        _at_most("train.valid_beam", self.valid_beam, MAX_BEAM)
        for name in ("patience", "valid_every", "warmup_steps", "max_steps", "max_bad_steps", "seed",
                     "threads", "max_minutes", "min_lr", "clip_grad", "keep_checkpoints",
                     "checkpoint_delay_s"):
            _non_negative(f"train.{name}", getattr(self, name))
        _at_most("train.threads", self.threads, MAX_THREADS)
        _at_most("train.seed", self.seed, MAX_SEED, "2**32 - 1, the range the random generators take")
        _positive("train.lr", self.lr)
        check_device(self.device, "train.device")
        if self.min_lr > self.lr:
            raise ConfigError(f"train.min_lr ({self.min_lr}) must be <= train.lr ({self.lr})")
        if not 0.0 < self.plateau_factor <= 1.0:
            raise ConfigError(f"train.plateau_factor must be in (0, 1], got {self.plateau_factor}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError("train.label_smoothing must be in [0, 1)")
        if not 0.0 <= self.sampling_ratio <= 1.0:
            raise ConfigError("train.sampling_ratio must be in [0, 1]")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision must be 'auto', 'fp32' or 'bf16', got "
                              f"{quote(self.precision)}")
        if self.schedule not in ("plateau", "inverse_sqrt"):
            raise ConfigError(f"train.schedule must be 'plateau' or 'inverse_sqrt', got "
                              f"{quote(self.schedule)}")
        if self.schedule == "inverse_sqrt" and not self.warmup_steps:
            raise ConfigError("train.schedule inverse_sqrt needs train.warmup_steps > 0")
        if self.kernels not in ("fast", "reference"):
            raise ConfigError(f"train.kernels must be 'fast' or 'reference', got {quote(self.kernels)}")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ConfigError(f"train.backend must be auto, gloo or nccl, got {quote(self.backend)}")


@dataclass
class DecodeConfig:
    """Beam search and output settings."""

    beam: int = 5
    length_penalty: float = 1.0  # GNMT's alpha; 0 means raw log-probability
    max_len_ratio: float = 1.5  # output length limit: ratio * source length + 5
    batch_size: int = 1000  # sentences per greedy batch (sorted by length); beam: 2 * this / beam
    n_best: int = 1
    ban_unk: bool = True  # never emit <unk>
    quantize: bool = False  # int8 dynamic quantization of linear layers (CPU decoding)
    # auto | fp32 | bf16, as train.precision but for decoding (an RNN's bf16 on a CPU is its
    # output layer's products, which decoding gains little from: see benchmarks/RESULTS.md)
    precision: str = "fp32"
    # The Transformer's attention to show (heatmaps, the API's attention field): the cross-attention
    # of decoder layer attention_layer (-1: the last), of head attention_head (-1: their mean).
    attention_layer: int = -1
    attention_head: int = -1
    # Tokens per sentence to translate; a longer one is cut or refused as data.long_pairs says.
    # Decoding time grows with the square of the length: this bounds it.
    max_input_len: int = 5000

    def validate(self) -> None:
        for name in ("beam", "batch_size", "n_best", "max_input_len"):
            _positive(f"decode.{name}", getattr(self, name))
        _at_most("decode.beam", self.beam, MAX_BEAM)
        if self.n_best > self.beam:
            raise ConfigError(f"decode.n_best ({self.n_best}) must be <= decode.beam ({self.beam})")
        _positive("decode.max_len_ratio", self.max_len_ratio)
        _at_most("decode.max_len_ratio", self.max_len_ratio, MAX_LEN_RATIO)
        if self.attention_head < -1:
            raise ConfigError(f"decode.attention_head must be a head's index or -1 (their mean), got "
                              f"{self.attention_head}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"decode.precision must be 'auto', 'fp32' or 'bf16', got "
                              f"{quote(self.precision)}")


@dataclass
class Config:
    """A whole run: ``data``, ``model``, ``train`` and ``decode`` sections."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)

    def validate(self) -> Config:
        """Check every setting: its type's range first (ints within +-2**62, floats finite,
        the same check for YAML, ``--set``, flags and the API), then each section's rules."""
        for section in self.sections():
            _check_section(section, getattr(self, section))
        joint = self.data.joint_vocab and self.data.tokenizer == "sentencepiece"
        if self.model.share_embeddings and not joint:
            raise ConfigError("model.share_embeddings needs a joint vocabulary (data.tokenizer: "
                              "sentencepiece, data.joint_vocab: true)")
        if self.model.arch == "transformer" and self.train.sampling_ratio:
            raise ConfigError("train.sampling_ratio (scheduled sampling) is for model.arch=rnn")
        return self

    @staticmethod
    def sections() -> tuple[str, ...]:
        return ("data", "model", "train", "decode")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None, source: str = "config") -> Config:
        """Build a config from nested dicts; unknown sections or keys are errors."""
        raw = raw or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
        config = cls()
        for section, values in raw.items():
            if section not in cls.sections():
                raise ConfigError(
                    f"{source}: unknown section {quote(section)}; expected "
                    f"{', '.join(cls.sections())}"
                )
            if values is None:
                continue
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: section {quote(section)} must be a mapping")
            for key, value in values.items():
                config.set(f"{section}.{key}", value, source=source)
        try:
            return config.validate()
        except ConfigError as error:
            raise ConfigError(f"{source}: {error}") from None

    @classmethod
    def load(cls, path: str | Path) -> Config:
        """Read a YAML config: a file, or the name of a packaged one (``seq2seq configs``)."""
        path = find_config(path)
        try:  # a regular file only, of bounded size: never /dev/zero or a FIFO's endless stream
            text = read_regular_file(path).decode("utf-8")
            raw = yaml.safe_load(text)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path} (packaged configs: "
                              f"{', '.join(packaged_configs()) or 'none'})") from None
        except OSError as error:
            raise ConfigError(f"{path}: cannot read: {error.strerror or error}") from None
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise ConfigError(f"{path}: not valid YAML: {_bounded(str(error))}") from None
        except RecursionError:
            raise ConfigError(f"{path}: not valid YAML: nested too deeply") from None
        except ValueError as error:  # not a regular file, or too large
            raise ConfigError(str(error)) from None
        return cls.from_dict(raw, source=str(path))

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    def set(self, dotted_key: str, value: Any, source: str = "--set") -> None:
        """Set ``section.key`` to ``value``, converting and checking its type."""
        section, _, key = dotted_key.partition(".")
        if section not in self.sections() or not key:
            raise ConfigError(
                f"{source}: {quote(dotted_key)} must look like section.key with section one of "
                f"{', '.join(self.sections())}"
            )
        target = getattr(self, section)
        fields = {f.name: f for f in dataclasses.fields(target)}
        if key not in fields:
            raise ConfigError(
                f"{source}: unknown setting {quote(dotted_key)}; {section} has: {', '.join(fields)}"
            )
        hint = typing.get_type_hints(type(target))[key]
        setattr(target, key, _coerce(value, hint, f"{source}: {dotted_key}"))

    def override(self, assignments: list[str]) -> Config:
        """Apply ``section.key=value`` strings (values parsed as YAML scalars)."""
        for assignment in assignments:
            if "=" not in assignment:
                raise ConfigError(f"--set {quote(assignment)}: expected section.key=value")
            key, _, text = assignment.partition("=")
            try:
                value = yaml.safe_load(text) if text.strip() else ""
            except (yaml.YAMLError, RecursionError):  # not YAML (or nested too deeply): a string
                value = text
            self.set(key.strip(), value)
        return self.validate()


PACKAGED_CONFIGS = Path(__file__).with_name("configs")


def packaged_configs() -> dict[str, Path]:
    """Name -> path of the configs installed with the package (``multi30k_en_de`` ...)."""
    return {p.stem: p for p in sorted(PACKAGED_CONFIGS.glob("*.yaml"))}


def find_config(name_or_path: str | Path) -> Path:
    """The path itself when it exists, else the packaged config of that name (with or
    without ``.yaml``), else the path unchanged, so that reading it names the missing file."""
    path = Path(name_or_path)
    if path.exists() or len(path.parts) != 1:
        return path
    return packaged_configs().get(path.stem if path.suffix == ".yaml" else path.name, path)


def _check_section(section: str, values: Any) -> None:
    for item in dataclasses.fields(values):
        _representable(f"{section}.{item.name}", getattr(values, item.name))
    values.validate()


def decode_settings(decode: DecodeConfig, source: str = "translate()", **values: Any) -> DecodeConfig:
    """A copy of ``decode`` with ``values`` set (None keeps a setting), converted and checked as
    a config file's are: the Python API's ``beam=0`` meets the same check as ``--beam 0``."""
    decode = dataclasses.replace(decode)
    hints = typing.get_type_hints(DecodeConfig)
    for key, value in values.items():
        if value is not None:
            setattr(decode, key, _coerce(value, hints[key], f"{source}: {key}"))
    _check_section("decode", decode)
    return decode


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name} must be > 0, got {value}")


def _non_negative(name: str, value: float) -> None:
    if not value >= 0:
        raise ConfigError(f"{name} must be >= 0, got {value}")


def _at_most(name: str, value: float, limit: float, why: str = "") -> None:
    if not value <= limit:
        raise ConfigError(f"{name} must be <= {limit}{f' ({why})' if why else ''}, got {value}")


def _representable(name: str, value: Any) -> None:
    """Every number a setting holds is finite and, for ints, within +-MAX_INT."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value}")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
        raise ConfigError(f"{name} must be at most 2**62 in size, got {quote(value)}")


def check_device(name: Any, where: str = "device") -> str:
    """``name`` if it is 'auto', 'cpu', 'cuda' or 'cuda:N', else a ConfigError naming ``where``.

    Checked by name only: whether CUDA is there is ``device.resolve_device``'s question."""
    if not isinstance(name, str) or not DEVICES.fullmatch(name):
        raise ConfigError(f"{where} must be auto, cpu, cuda or cuda:N, got {quote(name)}")
    return name


_QUOTE = reprlib.Repr()
_QUOTE.maxstring = _QUOTE.maxother = 120
_QUOTE.maxlevel, _QUOTE.maxlist, _QUOTE.maxdict = 2, 4, 4
_QUOTE.maxlong = 40


def quote(value: Any) -> str:
    """``repr(value)`` cut to about 200 characters: error messages quote what they were given,
    and a YAML alias bomb of 363 bytes expands to gigabytes when printed whole."""
    return _bounded(_QUOTE.repr(value))


def _bounded(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


# YAML 1.1 reads 1e-4 (no dot, no exponent sign) as a string; numeric fields accept it.
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Convert a YAML value to the field's type, or raise a ConfigError naming the field."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if isinstance(value, str) and str not in allowed and _NUMBER.fullmatch(value.strip()):
        value = float(value)
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"{where}: a value is required")
    for kind in allowed:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
                return value.lower() in ("true", "yes")
        elif kind is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
        elif kind is float:
            if isinstance(value, int | float) and not isinstance(value, bool):
                try:
                    return float(value)
                except OverflowError:  # an int past float's range
                    raise ConfigError(f"{where}: {quote(value)} is too large") from None
        elif kind is str:
            if isinstance(value, str):
                return value
    names = " or ".join(getattr(k, "__name__", str(k)) for k in allowed)
    raise ConfigError(f"{where}: expected {names}, got {quote(value)}")
