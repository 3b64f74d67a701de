"""Decoding token sequences: greedy search and batched beam search.

Both run on ``batch`` (greedy) or ``batch * beam`` (beam) rows at once and drop sentences
from the work as soon as they are finished, so a batch costs what its live sentences cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from seq2seq.model import Seq2Seq


@dataclass
class Hypothesis:
    """tokens: ids without bos and eos; score: the (length-normalised) log-probability;
    attention: (len(tokens) + 1, src_len) weights including the eos step, or None."""

    tokens: list[int]
    score: float
    attention: Tensor | None = None


def max_output_lengths(src_lengths: Tensor, ratio: float) -> Tensor:
    """(batch,) -> (batch,) step limits: ``ratio * source length + 5``, eos included."""
    return (src_lengths.float() * ratio).ceil().long() + 5


def length_penalty(length: int, alpha: float) -> float:
    """GNMT's ((5 + length) / 6) ** alpha; alpha 0 leaves scores unnormalised."""
    return ((5.0 + length) / 6.0) ** alpha


def _step_log_probs(model: Seq2Seq, prev: Tensor, state, memory, banned: Sequence[int]):
    """One decoder step: (rows, 1) ids -> (rows, vocab) float32 log-probs, state, weights."""
    scores, state, weights = model.decode(prev, state, memory)
    log_probs = torch.log_softmax(scores[:, 0].float(), dim=-1)
    if banned:
        log_probs[:, list(banned)] = float("-inf")
    return log_probs, state, None if weights is None else weights[:, 0]


@torch.inference_mode()
def greedy_search(model: Seq2Seq, src: Tensor, src_lengths: Tensor, *, bos: int, eos: int,
                  max_lengths: Tensor, banned: Sequence[int] = (),
                  return_attention: bool = False) -> list[Hypothesis]:
    """Pick the most probable token at each step.

    Args:
        src: (batch, src_len) ids; src_lengths: (batch,); max_lengths: (batch,) step limits.

    Returns:
        one Hypothesis per sentence, in batch order; score is the summed log-probability.
    """
    batch = src.size(0)
    memory, state = model.encode(src, src_lengths)
    active = torch.arange(batch, device=src.device)  # original index of each live row
    prev = torch.full((batch, 1), bos, dtype=torch.long, device=src.device)
    limits = max_lengths.to(src.device)
    tokens: list[list[int]] = [[] for _ in range(batch)]
    scores = [0.0] * batch
    attention: list[list[Tensor]] = [[] for _ in range(batch)]
    for step in range(int(limits.max())):
        log_probs, state, weights = _step_log_probs(model, prev, state, memory, banned)
        at_limit = step + 1 >= limits[active]
        if at_limit.any():  # the last allowed step must end the sentence
            log_probs[at_limit] = torch.where(
                torch.arange(log_probs.size(1), device=src.device) == eos, 0.0, float("-inf"))
        best_score, best = log_probs.max(dim=-1)
        for row, (index, token, score) in enumerate(
                zip(active.tolist(), best.tolist(), best_score.tolist())):
            scores[index] += score
            if token != eos:
                tokens[index].append(token)
            if return_attention and weights is not None:
                attention[index].append(weights[row].cpu())
        keep = best != eos
        if not bool(keep.any()):
            break
        if not bool(keep.all()):
            rows = keep.nonzero().squeeze(1)
            active, best = active[rows], best[rows]
            state, memory = state.select(rows), memory.select(rows)
        prev = best.unsqueeze(1)
    return [
        Hypothesis(tokens[i], scores[i],
                   torch.stack(attention[i]) if return_attention and attention[i] else None)
        for i in range(batch)
    ]


@torch.inference_mode()
def beam_search(model: Seq2Seq, src: Tensor, src_lengths: Tensor, *, beam: int, bos: int,
                eos: int, max_lengths: Tensor, alpha: float = 1.0, n_best: int = 1,
                banned: Sequence[int] = (),
                return_attention: bool = False) -> list[list[Hypothesis]]:
    """Beam search over ``batch * beam`` rows, in the manner of fairseq.

    Each step ranks the ``2 * beam`` best continuations of each sentence: those ending in eos
    among its top ``beam`` are finished (score normalised by GNMT's length penalty with
    ``alpha``), and the best ``beam`` that do not end go on. A sentence is done once it has
    ``beam`` finished hypotheses, and leaves the batch.

    Returns:
        for each sentence, in batch order, its ``n_best`` hypotheses sorted by score.
    """
    batch, k = src.size(0), beam
    device = src.device
    memory, state = model.encode(src, src_lengths)
    expand = torch.arange(batch, device=device).repeat_interleave(k)
    memory, state = memory.select(expand), state.select(expand)
    active = torch.arange(batch, device=device)
    limits = max_lengths.to(device)
    scores = torch.full((batch, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    history = torch.full((batch * k, 1), bos, dtype=torch.long, device=device)
    attn_history: Tensor | None = None  # (rows, steps, src_len)
    finished: list[list[Hypothesis]] = [[] for _ in range(batch)]

    for step in range(int(limits.max())):
        log_probs, state, weights = _step_log_probs(model, history[:, -1:], state, memory, banned)
        vocab = log_probs.size(1)
        at_limit = step + 1 >= limits[active]  # (live,)
        if at_limit.any():
            rows = at_limit.repeat_interleave(k)
            log_probs[rows] = torch.where(
                torch.arange(vocab, device=device) == eos, 0.0, float("-inf"))
        if return_attention and weights is not None:
            step_attn = weights.unsqueeze(1).float()
            attn_history = step_attn if attn_history is None else torch.cat(
                [attn_history, step_attn], 1)
        live = scores.size(0)
        total = log_probs.add_(scores.view(-1, 1)).view(live, k * vocab)  # in place: no copy
        cand_scores, cand_index = total.topk(min(2 * k, k * vocab), dim=1)  # (live, 2k)
        cand_origin = cand_index // vocab  # which beam of the sentence it extends
        cand_token = cand_index % vocab
        cand_rows = torch.arange(live, device=device).unsqueeze(1) * k + cand_origin
        is_eos = cand_token == eos
        rank = torch.arange(cand_scores.size(1), device=device).expand_as(cand_scores)
        ends = is_eos & (rank < k) & torch.isfinite(cand_scores)

        for i, j in ends.nonzero().tolist():
            row = int(cand_rows[i, j])
            toks = history[row, 1:].tolist()
            finished[int(active[i])].append(Hypothesis(
                toks, float(cand_scores[i, j]) / length_penalty(len(toks) + 1, alpha),
                attn_history[row].cpu() if attn_history is not None else None))

        # the best k candidates that go on; eos candidates sort last
        order = torch.where(is_eos, rank + cand_scores.size(1), rank)
        pick = order.topk(k, dim=1, largest=False).indices
        next_scores = cand_scores.gather(1, pick)
        next_rows = cand_rows.gather(1, pick)
        next_tokens = cand_token.gather(1, pick)

        # Done at the length limit, or with k finished hypotheses of which the best beats the
        # best live one. Stopping at k finished alone returned worse translations than greedy
        # search; live scores only fall, so for alpha 0 this is exact; for alpha > 0 the live
        # score is normalised at its current length, as Hugging Face's beam search does.
        best_live = (next_scores[:, 0] / length_penalty(step + 2, alpha)).tolist()
        done = at_limit | torch.tensor(
            [len(finished[b]) >= k and max(h.score for h in finished[b]) >= live
             for b, live in zip(active.tolist(), best_live)], dtype=torch.bool, device=device)
        if bool(done.all()):
            break
        keep = (~done).nonzero().squeeze(1)
        rows = next_rows[keep].reshape(-1)
        history = torch.cat([history[rows], next_tokens[keep].reshape(-1, 1)], dim=1)
        if attn_history is not None:
            attn_history = attn_history[rows]
        state = state.select(rows)
        if len(keep) < live:  # the k beams of a sentence share its memory: copy it only on exits
            memory = memory.select((keep.unsqueeze(1) * k + torch.arange(k, device=device)).reshape(-1))
        scores, active = next_scores[keep], active[keep]

    return [sorted(hyps, key=lambda h: h.score, reverse=True)[:n_best] for hyps in finished]
