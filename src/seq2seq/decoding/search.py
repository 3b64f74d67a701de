"""Decoding token sequences: greedy search and batched beam search.

Both run on ``batch`` (greedy) or ``batch * beam`` (beam) rows at once and drop finished
sentences from the work (greedy search in groups), so a batch costs about what its live
sentences cost. They talk to a decoding session only (``models/interface.py``: encode, step,
reorder; one per call, or the caller's for many batches), which holds all per-call state;
the default is ``seq2seq.kernels.decoding_session(model)``. The beams of a sentence share its
encoder memory (the step's ``beams``), and the best continuations are ranked by
``top_continuations``. Where the output layer rounds its scores (bf16 decoding on CPU), the
few candidates are rescored in float32 (``rescore_candidates``), so that rounding does not
reorder them.

Attention weights cost memory only when asked for (``with_attention``); beam search then
keeps each step's weights and each row's origin, and rebuilds the returned hypotheses'
attention at the end. ``should_stop`` (a deadline, say) is asked once per step; when it says
so, the search raises ``DecodingStopped``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from seq2seq.kernels import decoding_session
from seq2seq.models.interface import DecodingSession


class DecodingStopped(Exception):
    """``should_stop`` returned True: the search stopped after ``steps`` steps, with no result."""

    def __init__(self, steps: int) -> None:
        super().__init__(f"decoding stopped by the caller after {steps} steps")
        self.steps = steps


def _check_stop(should_stop: Callable[[], bool] | None, step: int) -> None:
    if should_stop is not None and should_stop():
        raise DecodingStopped(step)


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


BLOCK = 64  # vocabulary block width of ``top_continuations``
RESCORED_GREEDY = 2  # greedy search over rounded (bf16) scores: candidates rescored per row


def top_continuations(scores: Tensor, offsets: Tensor | None, group: int,
                      n: int) -> tuple[Tensor, Tensor]:
    """The ``n`` best of ``scores + offsets`` over each group of ``group`` rows, exactly.

    ``torch.topk`` and ``max`` with indices over (rows, vocabulary) are many times slower than
    ``amax`` on CPU (benchmarks/RESULTS.md). So the vocabulary is cut into blocks of
    ``BLOCK``: the ``n`` best entries lie in the ``n`` blocks with the highest maxima, and only
    those blocks are ranked in full.

    Args:
        scores: (groups * group, vocab) float32 log-probabilities.
        offsets: (groups * group,) added to every score of a row (the beam's score so far),
            or None (greedy search).
        group: rows ranked together (the beams of a sentence; 1 for greedy search).
        n: how many to keep, at most group * vocab.

    Returns:
        values (groups, n), best first, and indices (groups, n) into the group's
        ``group * vocab`` flattened entries (row in group * vocab + token).
    """
    rows, vocab = scores.shape
    groups = rows // group
    full, rest = divmod(vocab, BLOCK)
    block_max = scores[:, :full * BLOCK].view(rows, full, BLOCK).amax(-1)
    if rest:
        block_max = torch.cat([block_max, scores[:, full * BLOCK:].amax(-1, keepdim=True)], 1)
    blocks = block_max.size(1)
    if offsets is not None:
        block_max = block_max + offsets.unsqueeze(1)
    block_max = block_max.view(groups, group * blocks)
    n_blocks = min(n, group * blocks)
    top_blocks = block_max.topk(n_blocks, dim=1).indices  # (groups, n_blocks)
    row = (torch.arange(groups, device=scores.device).unsqueeze(1) * group
           + top_blocks // blocks)  # (groups, n_blocks)
    token = ((top_blocks % blocks) * BLOCK).unsqueeze(-1) + torch.arange(BLOCK, device=scores.device)
    outside = token >= vocab  # the short last block
    token = token.clamp_max(vocab - 1)
    candidates = scores[row.unsqueeze(-1), token]
    if offsets is not None:
        candidates = candidates + offsets[row].unsqueeze(-1)
    candidates = candidates.masked_fill(outside, float("-inf")).view(groups, -1)
    values, pick = candidates.topk(n, dim=1)
    flat = ((row - torch.arange(groups, device=scores.device).unsqueeze(1) * group) * vocab
            ).unsqueeze(-1).expand_as(token).reshape(groups, -1) + token.reshape(groups, -1)
    return values, flat.gather(1, pick)


def _step_log_probs(session: DecodingSession, prev: Tensor, state, memory,
                    banned: Sequence[int], at_limit: Tensor, eos: int, beams: int = 1):
    """One decoder step: (rows, 1) ids -> (rows, vocab) float32 log-probs, (rows, 1) their
    log-normalisers, state, weights. Banned tokens get -inf, and rows at their length limit
    (``at_limit``, (rows,) bool) can only end: eos gets log-probability 0."""
    scores, state, weights = session.step(prev, state, memory, beams)
    if getattr(session, "scores_are_log_probs", False):  # an ensemble's mean: ranked as it is
        log_probs = scores[:, 0].to(torch.float32, copy=True)
    else:
        log_probs = torch.log_softmax(scores[:, 0], dim=-1, dtype=torch.float32)
    log_norm = scores[:, 0, :1].float() - log_probs[:, :1]  # before bans: finite
    if banned:
        log_probs[:, list(banned)] = float("-inf")
    if bool(at_limit.any()):
        rows = at_limit.nonzero().squeeze(1)
        log_probs[rows] = float("-inf")
        log_probs[rows, eos] = 0.0
    return log_probs, log_norm, state, None if weights is None else weights[:, 0]


def rescore_candidates(session: DecodingSession, log_probs: Tensor, log_norm: Tensor, at_limit: Tensor,
                       rows: Tensor, tokens: Tensor, values: Tensor) -> Tensor:
    """Candidates' values with the output layer's rounding taken out (bf16 decoding).

    Each candidate's score is recomputed in float32 (``DecodingSession.exact_logits``), and so is
    its row's log-normaliser, with the exact scores of that row's candidates in place of
    the rounded ones. A row's candidates are its best tokens, so they hold most of its
    probability mass, and the error left is that of the rest's mass.

    Args:
        log_probs, log_norm: (rows, vocab) and (rows, 1): the step's log-softmax of rounded
            scores and its log-normalisers.
        at_limit: (rows,) bool, rows that can only end (left as they are).
        rows, tokens: candidates' rows and tokens, any one shape; each (row, token) once.
        values: that shape, the candidates' log-probabilities plus any offset.

    Returns:
        the values, corrected where the log-probability was finite.
    """
    exact = session.exact_logits(rows, tokens)
    if exact is None:
        return values
    rounded_lp, row_norm = log_probs[rows, tokens], log_norm[rows, 0]
    fixed = torch.isfinite(values) & torch.isfinite(rounded_lp) & ~at_limit[rows]
    # the row's probability mass that changes: exact minus rounded, over its candidates
    change = torch.where(fixed, (exact - row_norm).exp() - rounded_lp.exp(), 0.0)
    mass = torch.zeros(log_probs.size(0), device=log_probs.device).index_add_(
        0, rows.reshape(-1), change.reshape(-1))
    exact_lp = exact - row_norm - torch.log1p(mass[rows])
    return torch.where(fixed, values - rounded_lp + exact_lp, values)


@torch.inference_mode()
def greedy_search(model: nn.Module, src: Tensor, src_lengths: Tensor, *, bos: int, eos: int,
                  max_lengths: Tensor, banned: Sequence[int] = (), with_attention: bool = False,
                  session: DecodingSession | None = None,
                  should_stop: Callable[[], bool] | None = None) -> list[Hypothesis]:
    """Pick the most probable token at each step.

    Finished sentences leave the batch in groups (an eighth of the rows at a time), since
    copying the encoder memory at every step costs more than a few idle rows.

    Args:
        model: the model to decode with (in eval mode); only its default session reads it.
        src: (batch, src_len) ids; src_lengths: (batch,); max_lengths: (batch,) step limits.
        with_attention: fill each Hypothesis's attention.
        session: the decoding session to use (default: ``decoding_session(model)``).
        should_stop: asked before each step; True raises ``DecodingStopped``.

    Returns:
        one Hypothesis per sentence, in batch order; score is the summed log-probability.
    """
    batch, device = src.size(0), src.device
    session = session or decoding_session(model)
    memory, state = session.encode(src, src_lengths)
    limits = max_lengths.to(device)
    steps = int(limits.max())
    active = torch.arange(batch, device=device)  # original index of each row
    done = torch.zeros(batch, dtype=torch.bool, device=device)  # per row
    prev = torch.full((batch, 1), bos, dtype=torch.long, device=device)
    tokens = torch.full((batch, steps), eos, dtype=torch.long, device=device)
    scores = torch.zeros(batch, device=device)
    attention = torch.zeros(batch, steps, src.size(1), device=device) if with_attention else None
    rescored = RESCORED_GREEDY if session.rounds_scores else 1
    for step in range(steps):
        _check_stop(should_stop, step)
        at_limit = step + 1 >= limits[active]
        log_probs, log_norm, state, weights = _step_log_probs(
            session, prev, state, memory, banned, at_limit, eos)
        best_score, best = top_continuations(log_probs, None, 1, rescored)
        if rescored > 1:  # rank the few best of the rounded scores by their exact ones
            row = torch.arange(best.size(0), device=device).unsqueeze(1).expand_as(best)
            best_score = rescore_candidates(session, log_probs, log_norm, at_limit, row, best,
                                            best_score)
            pick = best_score.argmax(1, keepdim=True)
            best, best_score = best.gather(1, pick), best_score.gather(1, pick)
        best, best_score = best[:, 0], best_score[:, 0]
        live = ~done
        rows = active[live]
        tokens[rows, step] = best[live]
        scores.index_add_(0, rows, best_score[live])
        if attention is not None and weights is not None:
            attention[rows, step] = weights[live].float()
        done = done | (best == eos)
        if bool(done.all()):
            break
        if int(done.sum()) * 8 >= done.numel():  # compact: drop the finished rows
            keep = (~done).nonzero().squeeze(1)
            active, best, done = active[keep], best[keep], done[keep]
            state, memory = session.reorder_state(state, keep), session.reorder_memory(memory, keep)
        prev = best.unsqueeze(1)
    lengths = (tokens == eos).int().argmax(1).tolist()  # every sentence has ended
    token_lists, score_list = tokens.tolist(), scores.tolist()
    keep_attention = attention is not None and weights is not None
    return [Hypothesis(token_lists[i][:lengths[i]], score_list[i],
                       attention[i, :lengths[i] + 1].cpu() if keep_attention else None)
            for i in range(batch)]


class _AttentionTrail:
    """Beam search's attention, kept as each step's weights and each row's origin instead of
    every row's whole history copied at every step; ``rebuild`` follows a hypothesis back."""

    def __init__(self) -> None:
        self.weights: list[Tensor] = []  # step t: (rows_t, src_len)
        self.origins: list[Tensor] = []  # step t + 1's rows: (rows_t+1,) rows of step t

    def rebuild(self, ends: list[tuple[int, int]]) -> list[Tensor]:
        """(step, row) where each hypothesis ended -> its (step + 1, src_len) weights on CPU."""
        steps = torch.tensor([s for s, _ in ends])
        row = torch.tensor([r for _, r in ends], device=self.weights[0].device)
        out = self.weights[0].new_zeros(len(ends), int(steps.max()) + 1, self.weights[0].size(1))
        for t in range(int(steps.max()), -1, -1):
            on = (steps >= t).nonzero().squeeze(1).to(row.device)  # hypotheses that reach step t
            out[on, t] = self.weights[t][row[on]]
            if t > 0:
                row[on] = self.origins[t - 1][row[on]]
        out = out.cpu()
        return [out[i, :s + 1] for i, s in enumerate(steps.tolist())]


@torch.inference_mode()
def beam_search(model: nn.Module, src: Tensor, src_lengths: Tensor, *, beam: int, bos: int,
                eos: int, max_lengths: Tensor, alpha: float = 1.0, n_best: int = 1,
                banned: Sequence[int] = (), with_attention: bool = False,
                session: DecodingSession | None = None,
                should_stop: Callable[[], bool] | None = None) -> list[list[Hypothesis]]:
    """Beam search over ``batch * beam`` rows, in the manner of fairseq.

    Each step ranks the ``2 * beam`` best continuations of each sentence: those ending in eos
    among its top ``beam`` are finished (score normalised by GNMT's length penalty with
    ``alpha``), and the best ``beam`` that do not end go on. A sentence is done once it has
    ``beam`` finished hypotheses, and leaves the batch.

    ``model``, ``with_attention``, ``session``, ``should_stop``: as for ``greedy_search``.

    Returns:
        for each sentence, in batch order, its ``n_best`` hypotheses sorted by score.
    """
    batch, k = src.size(0), beam
    device = src.device
    session = session or decoding_session(model)
    memory, state = session.encode(src, src_lengths)
    active = torch.arange(batch, device=device)
    limits = max_lengths.to(device)
    scores = torch.zeros(batch, 1, device=device)
    # The first step decodes one row per sentence (all beams would start identical); its
    # best k continuations become the beams. From then on rows are sentences * k.
    history = torch.full((batch, 1), bos, dtype=torch.long, device=device)
    trail = _AttentionTrail() if with_attention else None
    finished: list[list[tuple[Hypothesis, int, int]]] = [[] for _ in range(batch)]  # (h, step, row)
    best_finished = torch.full((batch,), float("-inf"))  # best normalised finished score
    n_finished = torch.zeros(batch, dtype=torch.long)
    rescore = session.rounds_scores

    for step in range(int(limits.max())):
        _check_stop(should_stop, step)
        at_limit = step + 1 >= limits[active]  # (live,)
        group = scores.size(1)  # rows per sentence: 1 at the first step, then k
        row_at_limit = at_limit.repeat_interleave(group)
        log_probs, log_norm, state, weights = _step_log_probs(
            session, history[:, -1:], state, memory, banned, row_at_limit, eos, group)
        vocab = log_probs.size(1)
        if trail is not None and weights is not None:
            trail.weights.append(weights.float())
        live = scores.size(0)
        cand_scores, cand_index = top_continuations(  # (live, <= 2k) of the group * vocab ways on
            log_probs, scores.view(-1), group, min(2 * k, group * vocab))
        wanted = min(2 * k, k * vocab)
        if cand_scores.size(1) < wanted:  # a first step over fewer than 2k tokens: pad with
            missing = wanted - cand_scores.size(1)  # -inf, so eos never has to go on
            cand_scores = torch.cat([cand_scores, cand_scores.new_full((live, missing),
                                                                       float("-inf"))], 1)
            cand_index = torch.cat([cand_index, cand_index.new_zeros(live, missing)], 1)
        cand_origin = cand_index // vocab  # which beam of the sentence it extends
        cand_token = cand_index % vocab
        cand_rows = torch.arange(live, device=device).unsqueeze(1) * group + cand_origin
        if rescore:  # exact scores for the candidates of rounded ones, best first again
            cand_scores = rescore_candidates(session, log_probs, log_norm, row_at_limit,
                                             cand_rows, cand_token, cand_scores)
            cand_scores, order = cand_scores.sort(dim=1, descending=True)
            cand_rows, cand_token = cand_rows.gather(1, order), cand_token.gather(1, order)
        is_eos = cand_token == eos
        rank = torch.arange(cand_scores.size(1), device=device).expand_as(cand_scores)
        ends = is_eos & (rank < k) & torch.isfinite(cand_scores)

        if bool(ends.any()):
            end_rows = cand_rows[ends].tolist()
            end_scores = (cand_scores[ends] / length_penalty(step + 1, alpha)).tolist()
            for i, row, score in zip(ends.nonzero()[:, 0].tolist(), end_rows, end_scores):
                sentence = int(active[i])
                finished[sentence].append((Hypothesis(history[row, 1:].tolist(), score), step, row))
                n_finished[sentence] += 1
                best_finished[sentence] = max(float(best_finished[sentence]), score)

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
        best_live = next_scores[:, 0].cpu() / length_penalty(step + 2, alpha)
        active_cpu = active.cpu()
        done = at_limit | ((n_finished[active_cpu] >= k)
                           & (best_finished[active_cpu] >= best_live)).to(device)
        if bool(done.all()):
            break
        keep = (~done).nonzero().squeeze(1)
        rows = next_rows[keep].reshape(-1)
        history = torch.cat([history[rows], next_tokens[keep].reshape(-1, 1)], dim=1)
        if trail is not None:
            trail.origins.append(rows)
        state = session.reorder_state(state, rows)
        if len(keep) < live:  # memory holds each sentence once: copy it only on exits
            memory = session.reorder_memory(memory, keep)
        scores, active = next_scores[keep], active[keep]
    return _best_hypotheses(finished, n_best, trail)


def _best_hypotheses(finished: list[list[tuple[Hypothesis, int, int]]], n_best: int,
                     trail: _AttentionTrail | None) -> list[list[Hypothesis]]:
    """Each sentence's ``n_best`` finished hypotheses, best first, with their attention
    rebuilt from ``trail`` where it was kept."""
    chosen = [sorted(ends, key=lambda end: end[0].score, reverse=True)[:n_best] for ends in finished]
    if trail is not None and trail.weights:
        flat = [end for ends in chosen for end in ends]
        for (hypothesis, _, _), weights in zip(flat, trail.rebuild([(s, r) for _, s, r in flat])):
            hypothesis.attention = weights
    return [[hypothesis for hypothesis, _, _ in ends] for ends in chosen]
