"""Decoding many sentences: batches of similar length through greedy or beam search, results in
input order. ``decode_ids`` is the one decoding function of the package: the ``Translator``
(so ``translate``, ``evaluate`` and the server) and training's validation both call it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from seq2seq.config import DecodeConfig
from seq2seq.data.batches import collate
from seq2seq.data.text import DataError
from seq2seq.data.tokenizers import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer
from seq2seq.decoding.ensemble import session_for
from seq2seq.decoding.search import (
    DecodingStopped,
    Hypothesis,
    beam_search,
    greedy_search,
    max_output_lengths,
)
from seq2seq.kernels.ops import precision_autocast
from seq2seq.model_dir import CONFIG_FILE
from seq2seq.models.checkpoint import CheckpointError


def encode_source(sentence: str, tokenizer: Tokenizer, max_input_len: int, long_pairs: str = "skip",
                  where: str = "input") -> list[int]:
    """Source ids with eos, at most ``max_input_len`` tokens before it.

    Decoding time grows with the square of the length (every output step attends to every
    source token, and the output may be 1.5 times as long), so a longer sentence is cut
    (``long_pairs='truncate'``) or refused with a DataError naming ``where`` (``'skip'``).
    """
    if not isinstance(sentence, str):
        raise TypeError(f"{where}: expected a string, got {type(sentence).__name__}")
    ids = tokenizer.encode(sentence)
    if len(ids) > max_input_len:
        if long_pairs != "truncate":
            raise DataError(f"{where}: {len(ids)} tokens, more than decode.max_input_len="
                            f"{max_input_len}; raise it, or set data.long_pairs to 'truncate' to "
                            f"translate the first {max_input_len} tokens of such lines (in the "
                            f"model's {CONFIG_FILE})")
        ids = ids[:max_input_len]
    return ids + [EOS_ID]


def decode_ids(model: nn.Module, src_ids: Sequence[list[int]], settings: DecodeConfig,
               device: torch.device, precision: str = "fp32", return_attention: bool = False,
               source: str = "input", first_line: int = 1,
               should_stop: Callable[[], bool] | None = None) -> list[list[Hypothesis]]:
    """The ``settings.n_best`` best hypotheses of each source, best first, in input order.

    ``src_ids``: token ids ending in eos (``encode_source``). ``settings``: a checked decode
    section (``config.decode_settings``): beam (1 = greedy search), n_best, batch_size (beam
    search decodes ``2 * batch_size // beam`` sentences at once, so about twice as many rows),
    max_len_ratio, length_penalty, ban_unk. ``precision``: 'fp32' or 'bf16', the resolved
    ``decode.precision`` (validation's: ``train.precision``; see ``ops.precision_autocast``).
    The model must be in eval mode on ``device``.
    ``source`` names the sentences in errors (``source:line``, the first being ``first_line``).
    ``should_stop``: asked before each batch and each search step; when it returns True,
    ``search.DecodingStopped`` is raised (the server's batches whose requests all timed out or
    hung up).

    Sentences are decoded in batches of similar length. A sentence with no tokens (eos alone) is
    not decoded: its hypotheses are empty, with score 0, as Sockeye does; what a model makes of
    a lone eos is arbitrary.
    """
    beam, n_best, batch_size = settings.beam, settings.n_best, settings.batch_size
    if beam > 1:  # beam search decodes batch * beam rows: keep about 2 * batch_size of them
        batch_size = max(1, 2 * batch_size // beam)
    banned = [PAD_ID, BOS_ID] + ([UNK_ID] if settings.ban_unk else [])
    results: list[list[Hypothesis]] = [[] for _ in src_ids]
    for i, ids in enumerate(src_ids):
        if len(ids) == 1:  # eos alone; its eos step attends to it alone
            results[i] = [Hypothesis([], 0.0, torch.ones(1, 1) if return_attention else None)
                          for _ in range(n_best)]
    order = sorted((i for i, ids in enumerate(src_ids) if len(ids) > 1), key=lambda i: len(src_ids[i]))
    session = session_for(model, settings.attention_layer,  # this call's, for all its batches
                          settings.attention_head)  # (an ensemble's too)
    with torch.inference_mode(), precision_autocast(precision, device.type, model):
        for start in range(0, len(order), batch_size):
            if should_stop is not None and should_stop():
                raise DecodingStopped(0)
            indices = order[start:start + batch_size]
            batch = collate(indices, src_ids).to(device)
            limits = max_output_lengths(batch.src_lengths, settings.max_len_ratio)
            if beam == 1:
                found = [[h] for h in greedy_search(
                    model, batch.src, batch.src_lengths, bos=BOS_ID, eos=EOS_ID, max_lengths=limits,
                    banned=banned, with_attention=return_attention, session=session,
                    should_stop=should_stop)]
            else:
                found = beam_search(
                    model, batch.src, batch.src_lengths, beam=beam, bos=BOS_ID, eos=EOS_ID,
                    max_lengths=limits, alpha=settings.length_penalty, n_best=n_best, banned=banned,
                    with_attention=return_attention, session=session, should_stop=should_stop)
            for index, hyps in zip(indices, found):
                if not hyps or any(math.isnan(h.score) for h in hyps):  # NaN: none could win
                    raise CheckpointError(f"{source}:{first_line + index}: the model's scores are not finite "
                                          f"(NaN or infinite weights or activations)")
                results[index] = hyps
    return results
