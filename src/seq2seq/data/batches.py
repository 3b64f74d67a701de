"""Training batches: encoded pairs, token-bounded batches of similar lengths, padded tensors."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from seq2seq.data.tokenizers import BOS_ID, EOS_ID, PAD_ID, Tokenizer


@dataclass
class EncodedCorpus:
    """Token ids of a parallel corpus, and what was left out or cut to get them."""

    src: list[list[int]]  # source ids, each ending with EOS_ID (so length >= 1)
    tgt: list[list[int]]  # target ids without bos/eos
    skipped_empty: int = 0
    skipped_long: int = 0
    truncated: int = 0


def encode_corpus(src_lines: Sequence[str], tgt_lines: Sequence[str], src_tok: Tokenizer,
                  tgt_tok: Tokenizer, max_len: int, long_pairs: str = "skip", drop_empty: bool = True,
                  log: Callable[[str], None] = print) -> EncodedCorpus:
    """Encode aligned lines; pairs with an empty side or a side over ``max_len`` tokens are
    dropped (or, for long ones with ``long_pairs='truncate'``, cut), counted and logged."""
    if long_pairs not in ("skip", "truncate"):
        raise ValueError(f"long_pairs must be 'skip' or 'truncate', got {long_pairs!r}")
    corpus = EncodedCorpus([], [])
    for src_line, tgt_line in zip(src_lines, tgt_lines, strict=True):
        src, tgt = src_tok.encode(src_line), tgt_tok.encode(tgt_line)
        if drop_empty and not (src_line.strip() and tgt_line.strip() and src and tgt):
            corpus.skipped_empty += 1
            continue
        if len(src) > max_len or len(tgt) > max_len:
            if long_pairs == "skip":
                corpus.skipped_long += 1
                continue
            src, tgt = src[:max_len], tgt[:max_len]
            corpus.truncated += 1
        corpus.src.append(src + [EOS_ID])
        corpus.tgt.append(tgt)
    log(f"encoded {len(corpus.src)} of {len(src_lines)} pairs: skipped {corpus.skipped_empty} "
        f"with an empty side, {corpus.skipped_long} longer than {max_len} tokens; "
        f"truncated {corpus.truncated}")
    return corpus


# -- batching ---------------------------------------------------------------------------------
class Batches(Sequence):
    """An epoch's batches: ``batches[i]`` is batch i's example indices, an integer array.

    Held as one array of every example index, grouped batch by batch (``order``), where each
    batch starts in it (``bounds``), and the order the batches are served in (``sequence``):
    a few bytes per example, however many batches there are.
    """

    def __init__(self, order: np.ndarray, bounds: np.ndarray, sequence: np.ndarray) -> None:
        self.order, self.bounds, self.sequence = order, bounds, sequence

    def __len__(self) -> int:
        return len(self.sequence)

    def __getitem__(self, index):  # int -> np.ndarray; slice -> list[np.ndarray]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        batch = int(self.sequence[index])
        return self.order[self.bounds[batch]:self.bounds[batch + 1]]


def make_batches(src_lengths: Sequence[int], tgt_lengths: Sequence[int], batch_tokens: int,
                 max_sentences: int, seed: int, epoch: int, shuffle: bool = True) -> Batches:
    """Group example indices into batches of similar length.

    Examples are ordered by (target length, source length), ties broken at random, and cut into
    consecutive runs with ``len(batch) * longest_target <= batch_tokens`` (target length + 1 for
    EOS) and ``len(batch) <= max_sentences``; an example over the budget alone forms its own
    batch. The batches' order is then shuffled. Deterministic for a given (seed, epoch).
    Memory: the lengths (NumPy arrays are used as they are), an index per example, and while
    sorting, a few arrays the size of the largest group of one target length.
    """
    if len(src_lengths) != len(tgt_lengths):
        raise ValueError(f"{len(src_lengths)} source lengths but {len(tgt_lengths)} target lengths")
    rng = np.random.default_rng([seed, epoch])
    tgt = np.asarray(tgt_lengths)
    src = np.asarray(src_lengths)
    order = np.empty(len(tgt), dtype=np.int32 if len(tgt) < 2**31 else np.int64)
    counts = np.bincount(tgt) if len(tgt) else np.zeros(0, np.int64)  # examples per target length
    lengths = np.flatnonzero(counts).tolist()  # the distinct target lengths, ascending
    placed = 0
    for length in lengths:  # one target length at a time: temporaries the size of its group
        group = np.flatnonzero(tgt == length)
        rng.shuffle(group)  # ties at random ...
        group = group[np.argsort(src[group], kind="stable")]  # ... among equal source lengths
        order[placed:placed + len(group)] = group
        placed += len(group)
    # Sorted by target length, a batch's longest target is its last one: a run of examples of
    # one length L fills batches of cap(L) = max(1, min(max_sentences, batch_tokens // (L+1))).
    # Walking the distinct lengths (at most max_len + 1 of them) gives the same cuts as
    # walking the examples one by one.
    sizes: list[int] = []
    current = 0  # examples in the open batch
    for length in lengths:
        count = int(counts[length])
        cap = max(1, min(max_sentences, batch_tokens // (length + 1)))
        if current >= cap:
            sizes.append(current)
            current = 0
        take = min(count, cap - current)
        current, count = current + take, count - take
        if count:
            sizes.append(current)
            sizes.extend([cap] * (count // cap))
            current = count % cap
    if current:
        sizes.append(current)
    bounds = np.concatenate(([0], np.cumsum(sizes, dtype=np.int64)))
    sequence = (rng.permutation(len(sizes)) if shuffle else np.arange(len(sizes))).astype(np.int32)
    return Batches(order, bounds, sequence)


@dataclass
class Batch:
    """One padded batch. ``tgt_in``/``tgt_out`` are (batch, 0) when there is no target."""

    src: Tensor  # (batch, src_len) long, PAD_ID padded
    src_lengths: Tensor  # (batch,) long
    tgt_in: Tensor  # (batch, tgt_len + 1): BOS + target, PAD_ID padded
    tgt_out: Tensor  # (batch, tgt_len + 1): target + EOS, PAD_ID padded
    n_tokens: int  # real target tokens, EOS included: (tgt_out != PAD_ID).sum()
    indices: list[int]

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.src.to(device), self.src_lengths.to(device), self.tgt_in.to(device),
                     self.tgt_out.to(device), self.n_tokens, self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def collate(indices: Sequence[int], src: Sequence[list[int]],
            tgt: Sequence[list[int]] | None = None) -> Batch:
    """Pad the examples ``indices`` of ``src`` (and ``tgt``) into a ``Batch``."""
    indices = [int(i) for i in indices]  # a batch of make_batches is an array
    sources = [src[i] for i in indices]
    src_lengths = torch.tensor([len(s) for s in sources], dtype=torch.long)
    if tgt is None:
        empty = torch.zeros(len(indices), 0, dtype=torch.long)
        return Batch(_pad(sources), src_lengths, empty, empty.clone(), 0, indices)
    targets = [tgt[i] for i in indices]
    tgt_in = _pad([[BOS_ID, *t] for t in targets])
    tgt_out = _pad([[*t, EOS_ID] for t in targets])
    n_tokens = sum(len(t) + 1 for t in targets)
    return Batch(_pad(sources), src_lengths, tgt_in, tgt_out, n_tokens, indices)


def _pad(sequences: list[list[int]]) -> Tensor:
    """(len(sequences), longest) long tensor, PAD_ID after each sequence."""
    if not sequences:
        return torch.zeros(0, 0, dtype=torch.long)
    longest = max(map(len, sequences))
    # one tensor from padded lists: a tensor per row costs about 1 ms a training batch
    return torch.tensor([[*s, *[PAD_ID] * (longest - len(s))] for s in sequences],
                        dtype=torch.long)
