"""Greedy and beam search: beam 1 equals greedy, n-best order, length limits, bans, bf16
decoding's rescored candidates, attention rebuilt from back-pointers, and stopping on request."""

from __future__ import annotations

import math

import pytest
import torch

from seq2seq.config import ModelConfig
from seq2seq.decoding import search
from seq2seq.decoding.search import (
    DecodingStopped,
    beam_search,
    greedy_search,
    length_penalty,
    max_output_lengths,
    rescore_candidates,
    top_continuations,
)
from seq2seq.kernels import apply as apply_kernels
from seq2seq.models.rnn.model import Seq2Seq
from seq2seq.models.rnn.session import RNNSession

VOCAB, PAD, BOS, EOS = 9, 0, 1, 2
LENGTHS = torch.tensor([6, 3, 5, 1])

CONFIGS = [
    dict(cell="gru", attention="bahdanau", input_feeding=True, bidirectional=True),
    dict(cell="lstm", attention="general", input_feeding=False, bidirectional=True,
         encoder_layers=2, decoder_layers=2),
    dict(cell="rnn", attention=None, bidirectional=False),
    dict(cell="gru", attention="dot", input_feeding=True, bidirectional=False),
]


def model(seed: int = 0, **kwargs) -> Seq2Seq:
    torch.manual_seed(seed)
    settings = dict(embed_size=8, hidden_size=12, dropout=0.0)
    settings.update(kwargs)
    net = Seq2Seq(ModelConfig(**settings), src_vocab=VOCAB, tgt_vocab=VOCAB, pad_id=PAD).eval()
    with torch.no_grad():  # sharper output distributions: sentences end at varied lengths
        net.generator.weight.mul_(2.0)
        net.decoder.combine.weight.mul_(2.0)
    apply_kernels(net, "fast")  # decoding through the fast session
    return net


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, VOCAB, (len(LENGTHS), int(LENGTHS.max())), generator=g)
    for row, n in enumerate(LENGTHS.tolist()):
        src[row, n:] = PAD
    return src, LENGTHS


@pytest.mark.parametrize("settings", CONFIGS, ids=lambda d: f"{d['cell']}-{d['attention']}")
def test_greedy_equals_beam_one(settings):
    lengths_seen = []
    for seed in range(6):
        net, (src, lengths) = model(seed, **settings), batch(seed)
        limits = max_output_lengths(lengths, 1.5)
        greedy = greedy_search(net, src, lengths, bos=BOS, eos=EOS, max_lengths=limits)
        beam = beam_search(net, src, lengths, beam=1, bos=BOS, eos=EOS, max_lengths=limits,
                           alpha=0.0)
        assert [h.tokens for h in greedy] == [hyps[0].tokens for hyps in beam]
        for g, hyps in zip(greedy, beam):  # alpha 0: both scores are the summed log-probability
            assert hyps[0].score == pytest.approx(g.score, abs=1e-4)
        lengths_seen.append({len(h.tokens) for h in greedy})
    # some batch had sentences of different lengths: rows left the batch while others went on
    assert any(len(seen) > 1 for seen in lengths_seen)


def test_n_best_lists_are_sorted_by_score():
    net, (src, lengths) = model(**CONFIGS[0]), batch()
    results = beam_search(net, src, lengths, beam=4, n_best=4, bos=BOS, eos=EOS,
                          max_lengths=max_output_lengths(lengths, 2.0), alpha=1.0)
    assert len(results) == len(LENGTHS)
    for hyps in results:
        assert 1 <= len(hyps) <= 4
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)
        assert all(math.isfinite(s) for s in scores)


def test_beam_score_is_length_normalised_log_probability():
    net, (src, lengths) = model(**CONFIGS[2]), batch()
    hyps = beam_search(net, src[:1], lengths[:1], beam=3, bos=BOS, eos=EOS,
                       max_lengths=max_output_lengths(lengths[:1], 1.5), alpha=0.7)[0]
    best = hyps[0]
    # rescore the hypothesis with teacher forcing
    tgt_in = torch.tensor([[BOS] + best.tokens])
    gold = torch.tensor(best.tokens + [EOS])
    with torch.no_grad():
        scores, _ = net(src[:1, :int(lengths[0])], lengths[:1], tgt_in)
    log_prob = torch.log_softmax(scores[0], -1).gather(1, gold.unsqueeze(1)).sum().item()
    assert best.score == pytest.approx(log_prob / length_penalty(len(gold), 0.7), abs=1e-4)


@pytest.mark.parametrize("beam", [1, 3])
def test_search_respects_max_lengths(beam):
    net, (src, lengths) = model(**CONFIGS[1]), batch()
    with torch.no_grad():
        net.generator.bias[EOS] -= 10.0  # eos never wins on its own: only the limit ends
    limits = torch.tensor([1, 2, 4, 7])
    if beam == 1:
        results = [[h] for h in greedy_search(net, src, lengths, bos=BOS, eos=EOS, max_lengths=limits)]
    else:
        results = beam_search(net, src, lengths, beam=beam, n_best=beam, bos=BOS, eos=EOS,
                              max_lengths=limits)
    for hyps, limit in zip(results, limits.tolist()):
        assert hyps, "every sentence gets a hypothesis"
        for h in hyps:
            assert len(h.tokens) + 1 <= limit  # eos counts as a step
        assert len(hyps[0].tokens) + 1 == limit  # it ran to the limit
        assert EOS not in hyps[0].tokens


def test_banned_tokens_never_appear():
    net, (src, lengths) = model(**CONFIGS[0]), batch()
    limits = max_output_lengths(lengths, 2.0)
    banned = [3, 4, 5]
    for hyps in beam_search(net, src, lengths, beam=3, n_best=3, bos=BOS, eos=EOS,
                            max_lengths=limits, banned=banned):
        assert all(not set(h.tokens) & set(banned) for h in hyps)
    for h in greedy_search(net, src, lengths, bos=BOS, eos=EOS, max_lengths=limits, banned=banned):
        assert not set(h.tokens) & set(banned)


def test_attention_is_returned_per_output_step():
    net, (src, lengths) = model(**CONFIGS[0]), batch()
    limits = max_output_lengths(lengths, 1.5)
    greedy = greedy_search(net, src, lengths, bos=BOS, eos=EOS, max_lengths=limits,
                           with_attention=True)
    beam = beam_search(net, src, lengths, beam=2, bos=BOS, eos=EOS, max_lengths=limits,
                       with_attention=True)
    for hyp, n in zip([*greedy, *(h[0] for h in beam)], [*LENGTHS.tolist()] * 2):
        assert hyp.attention.shape[0] == len(hyp.tokens) + 1  # the eos step included
        torch.testing.assert_close(hyp.attention.sum(-1), torch.ones(hyp.attention.shape[0]))
        assert torch.all(hyp.attention[:, n:] == 0)


def test_max_output_lengths_and_length_penalty():
    assert max_output_lengths(torch.tensor([1, 4]), 1.5).tolist() == [7, 11]
    assert length_penalty(7, 0.0) == 1.0
    assert length_penalty(1, 1.0) == 1.0


@pytest.mark.parametrize("vocab", [9, 64, 130, 200])
@pytest.mark.parametrize("group, n", [(1, 1), (3, 6), (2, 4)])
def test_top_continuations_equal_topk(vocab, group, n):
    g = torch.Generator().manual_seed(vocab + group)
    groups = 5
    log_probs = torch.log_softmax(torch.randn(groups * group, vocab, generator=g) * 3, -1)
    log_probs[:, :2] = float("-inf")  # banned tokens
    offsets = torch.randn(groups * group, generator=g)
    offsets[1] = float("-inf")  # a beam that does not exist yet
    values, index = top_continuations(log_probs, offsets, group, n)
    want_values, want_index = (log_probs + offsets.unsqueeze(1)).view(groups, -1).topk(n, dim=1)
    torch.testing.assert_close(values, want_values)
    finite = torch.isfinite(want_values)  # -inf entries tie: any index will do
    assert finite.any() and torch.equal(index[finite], want_index[finite])


def test_beam_wider_than_vocabulary_is_exhaustive():
    """Beam 12 over 9 tokens with two steps at most: the first step (one row per sentence)
    has fewer candidates than beams, and the search must still return every possible output,
    [eos] or [t, eos], with its score. At the limit eos is forced (log-probability 0), so
    [t, eos] scores the first step's log-probability of t."""
    net, (src, lengths) = model(**CONFIGS[0]), batch()
    results = beam_search(net, src, lengths, beam=12, n_best=12, bos=BOS, eos=EOS,
                          max_lengths=torch.full_like(lengths, 2), alpha=0.0)
    with torch.no_grad():
        for i, hyps in enumerate(results):
            n = int(lengths[i])
            first, _ = net(src[i:i + 1, :n], lengths[i:i + 1], torch.tensor([[BOS]]))
            first = torch.log_softmax(first[0, 0], -1)
            want = {(): first[EOS].item()}
            want.update({(t,): first[t].item() for t in range(VOCAB) if t != EOS})
            got = {tuple(h.tokens): h.score for h in hyps}
            assert got.keys() == want.keys()
            for output, score in want.items():
                assert got[output] == pytest.approx(score, abs=1e-5)
            assert [h.score for h in hyps] == sorted(got.values(), reverse=True)


class _ExactScores:
    """Stands in for the model in ``rescore_candidates``: knows the exact scores."""

    def __init__(self, exact: torch.Tensor) -> None:
        self.exact = exact

    def exact_logits(self, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.exact[rows, tokens]


def test_rescore_candidates_removes_the_rounding():
    """Scores rounded to bf16 (about 0.03 off at 10) give log-probabilities off by as much;
    rescoring each row's best candidates in float32 leaves a small part of that error, and
    rows at their length limit, banned tokens and -inf padding as they were."""
    g = torch.Generator().manual_seed(0)
    rows, vocab = 12, 300
    exact = torch.randn(rows, vocab, generator=g) * 4 + 8
    rounded = exact.bfloat16().float()
    log_probs = torch.log_softmax(rounded, -1)
    log_probs[:, 5] = float("-inf")  # a banned token
    at_limit = torch.zeros(rows, dtype=torch.bool)
    at_limit[3] = True
    log_probs[3] = float("-inf")
    log_probs[3, 2] = 0.0  # the row can only end
    offsets = torch.randn(rows, 1, generator=g)
    values, tokens = (log_probs + offsets).topk(4, dim=1)
    tokens[:, -1] = 5  # each row's last candidate: the banned token
    values[:, -1] = float("-inf")
    row = torch.arange(rows).unsqueeze(1).expand_as(tokens)
    log_norm = torch.logsumexp(rounded, -1, keepdim=True)
    got = rescore_candidates(_ExactScores(exact), log_probs, log_norm, at_limit, row, tokens,
                             values)
    want = torch.log_softmax(exact, -1)[row, tokens] + offsets
    normal = (~at_limit).unsqueeze(1) & torch.isfinite(values)
    before = (values - want)[normal].abs().max()
    after = (got - want)[normal].abs().max()
    assert before > 0.01 and after < before / 5
    assert torch.equal(got[3], values[3]) and torch.equal(got[:, -1], values[:, -1])


def _decode_all(net: Seq2Seq, src, lengths, precision):
    limits = max_output_lengths(lengths, 2.0)
    assert apply_kernels(net, "fast", "cpu", precision).bf16_output == (precision == "bf16")
    greedy = greedy_search(net, src, lengths, bos=BOS, eos=EOS, max_lengths=limits)
    beam = beam_search(net, src, lengths, beam=4, bos=BOS, eos=EOS, max_lengths=limits,
                       n_best=4)
    return greedy, beam


def test_bf16_output_layer_decodes_as_float32_once_rescored(monkeypatch):
    """Decoding with the output layer's product in bf16 ranks by rounded scores and rescores
    the candidates: the same translations as float32 and scores much closer to float32's
    than without rescoring, where translations change."""
    torch.manual_seed(0)
    net = Seq2Seq(ModelConfig(embed_size=16, hidden_size=32, dropout=0.0), src_vocab=40,
                  tgt_vocab=400, pad_id=PAD).eval()
    with torch.no_grad():  # scores of about +-20: rounding errors of up to 0.06
        net.generator.weight.mul_(10.0)
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 9, (48,), generator=g)
    src = torch.randint(3, 40, (48, 8), generator=g)
    src[torch.arange(8) >= lengths.unsqueeze(1)] = PAD

    def decode(precision):
        greedy, beam = _decode_all(net, src, lengths, precision)
        n_best = [h.tokens for hyps in beam for h in hyps]
        return n_best, [([h.tokens for h in greedy], torch.tensor([h.score for h in greedy])),
                        ([hyps[0].tokens for hyps in beam],
                         torch.tensor([hyps[0].score for hyps in beam]))]

    n_best32, results32 = decode("fp32")
    n_best16, results16 = decode("bf16")
    monkeypatch.setattr(search, "rescore_candidates", lambda *args: args[-1])
    monkeypatch.setattr(search, "RESCORED_GREEDY", 1)
    n_best_rounded, results_rounded = decode("bf16")

    assert n_best16 == n_best32
    for (tokens, exact), (tokens16, rescored), (tokens_r, rounded) in zip(  # greedy, beam
            results32, results16, results_rounded):
        assert tokens16 == tokens and tokens_r != tokens
        same = [i for i in range(len(tokens)) if tokens_r[i] == tokens[i]]
        assert (rescored - exact).abs().max() * 3 < (rounded - exact)[same].abs().max()


@pytest.mark.parametrize("settings", [CONFIGS[0], CONFIGS[3]], ids=["bahdanau-feeding", "dot"])
def test_beam_attention_is_each_hypothesis_own_path(settings):
    """Beam search keeps each step's weights and each row's origin, and rebuilds a returned
    hypothesis's attention from them: the weights that teacher forcing its own tokens gives,
    for every one of the n best, wherever its beam came from."""
    net, (src, lengths) = model(2, **settings), batch(2)
    apply_kernels(net, "reference")
    limits = max_output_lengths(lengths, 2.0)
    results = beam_search(net, src, lengths, beam=4, n_best=4, bos=BOS, eos=EOS,
                          max_lengths=limits, with_attention=True)
    checked = 0
    for i, hyps in enumerate(results):
        for hyp in hyps:
            n = int(lengths[i])
            tgt_in = torch.tensor([[BOS, *hyp.tokens]])
            with torch.no_grad():
                _, weights = net(src[i:i + 1, :n], lengths[i:i + 1], tgt_in)
            torch.testing.assert_close(hyp.attention[:, :n], weights[0], atol=1e-5, rtol=1e-5)
            assert torch.all(hyp.attention[:, n:] == 0)
            checked += 1
    assert checked == 4 * len(LENGTHS)
    assert len({len(h.tokens) for hyps in results for h in hyps}) > 1


def test_attention_is_skipped_unless_asked_for():
    net, (src, lengths) = model(**CONFIGS[0]), batch()
    limits = max_output_lengths(lengths, 1.5)
    greedy = greedy_search(net, src, lengths, bos=BOS, eos=EOS, max_lengths=limits)
    beam = beam_search(net, src, lengths, beam=3, n_best=3, bos=BOS, eos=EOS, max_lengths=limits)
    assert all(h.attention is None for h in [*greedy, *(h for hyps in beam for h in hyps)])
    with_weights = beam_search(net, src, lengths, beam=3, n_best=3, bos=BOS, eos=EOS,
                               max_lengths=limits, with_attention=True)
    assert [[(h.tokens, h.score) for h in hyps] for hyps in beam] == \
        [[(h.tokens, h.score) for h in hyps] for hyps in with_weights]


@pytest.mark.parametrize("beam", [1, 3])
def test_should_stop_is_asked_once_per_step_and_stops_the_search(beam):
    net, (src, lengths) = model(**CONFIGS[0]), batch()
    limits = max_output_lengths(lengths, 1.5) + 20

    def run(should_stop):
        if beam == 1:
            return greedy_search(net, src, lengths, bos=BOS, eos=EOS, max_lengths=limits,
                                 should_stop=should_stop)
        return beam_search(net, src, lengths, beam=beam, bos=BOS, eos=EOS, max_lengths=limits,
                           should_stop=should_stop)

    calls = []
    want = run(None)
    assert run(lambda: calls.append(1) and False) == want  # asked, never stopping: same result
    steps = len(calls)
    assert steps >= 2
    calls.clear()
    with pytest.raises(DecodingStopped, match="after 1 steps") as stopped:
        run(lambda: calls.append(1) is None and len(calls) > 1)
    assert stopped.value.steps == 1 and len(calls) == 2


def test_search_talks_to_the_session_it_is_given():
    """Any object with the session interface decodes: here the plain session, wrapped to
    count its calls; the model argument is not used when a session is given."""
    net, (src, lengths) = model(**CONFIGS[0]), batch()
    limits = max_output_lengths(lengths, 1.5)
    calls = {"encode": 0, "step": 0, "reorder_state": 0}

    class Counting(RNNSession):
        def encode(self, *args):
            calls["encode"] += 1
            return super().encode(*args)

        def step(self, *args):
            calls["step"] += 1
            return super().step(*args)

        def reorder_state(self, *args):
            calls["reorder_state"] += 1
            return super().reorder_state(*args)

    apply_kernels(net, "reference")
    want = beam_search(net, src, lengths, beam=2, bos=BOS, eos=EOS, max_lengths=limits)
    got = beam_search(None, src, lengths, beam=2, bos=BOS, eos=EOS, max_lengths=limits,
                      session=Counting(net))
    assert [[(h.tokens, h.score) for h in hyps] for hyps in got] == \
        [[(h.tokens, h.score) for h in hyps] for hyps in want]
    assert calls["encode"] == 1 and calls["step"] >= 2 and calls["reorder_state"] == calls["step"] - 1
