"""Seq2Seq: shapes for every cell and layout, teacher forcing, scheduled sampling, padding."""

from __future__ import annotations

import pytest
import torch

from seq2seq.config import ConfigError, ModelConfig
from seq2seq.kernels import apply as apply_kernels
from seq2seq.kernels import decoding_session, policy
from seq2seq.kernels.session import FastRNNSession
from seq2seq.models.rnn.model import Seq2Seq
from seq2seq.models.rnn.session import RNNSession

VOCAB, FEATURES, LENGTHS, TGT_LEN = 11, 3, [6, 2, 4], 5


def config(**kwargs) -> ModelConfig:
    base = dict(embed_size=8, hidden_size=10, dropout=0.0)
    base.update(kwargs)
    return ModelConfig(**base)


def token_model(precision: str = "fp32", **kwargs) -> Seq2Seq:
    """A model with the fast kernels of a CPU in ``precision`` applied (bf16: its decoding
    session is the fast one, ``FastRNNSession``)."""
    torch.manual_seed(0)
    model = Seq2Seq(config(**kwargs), src_vocab=VOCAB, tgt_vocab=VOCAB).eval()
    apply_kernels(model, "fast", precision=precision)
    return model


def vector_model(feedback: str = "onehot", **kwargs) -> Seq2Seq:
    torch.manual_seed(0)
    return Seq2Seq(config(**kwargs), src_features=FEATURES, tgt_features=4,
                   vector_feedback=feedback).eval()


def token_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """src (3, 6) ids padded with 0, lengths (3,), tgt_in (3, TGT_LEN) starting with bos 1."""
    g = torch.Generator().manual_seed(1)
    src = torch.randint(3, VOCAB, (len(LENGTHS), max(LENGTHS)), generator=g)
    for row, n in enumerate(LENGTHS):
        src[row, n:] = 0
    tgt_in = torch.randint(3, VOCAB, (len(LENGTHS), TGT_LEN), generator=g)
    tgt_in[:, 0] = 1
    return src, torch.tensor(LENGTHS), tgt_in


LAYOUTS = [
    dict(cell=cell, encoder_layers=layers, decoder_layers=layers, bidirectional=bi)
    for cell in ("rnn", "gru", "lstm") for layers in (1, 2) for bi in (False, True)
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda d: f"{d['cell']}-{d['encoder_layers']}"
                         f"{'-bi' if d['bidirectional'] else ''}")
@pytest.mark.parametrize("attention, feeding", [(None, False), ("bahdanau", True), ("general", False)])
def test_forward_shapes_for_every_cell_and_layout(layout, attention, feeding):
    model = token_model(attention=attention, input_feeding=feeding, **layout)
    src, lengths, tgt_in = token_batch()
    scores, weights = model(src, lengths, tgt_in)
    assert scores.shape == (3, TGT_LEN, VOCAB)
    if attention is None:
        assert weights is None
    else:
        assert weights.shape == (3, TGT_LEN, max(LENGTHS))
        torch.testing.assert_close(weights.sum(-1), torch.ones(3, TGT_LEN))
        for row, n in enumerate(LENGTHS):
            assert torch.all(weights[row, :, n:] == 0)
    # the decoder state has one entry per decoder layer
    memory, state = model.encode(src, lengths)
    hidden = state.hidden[0] if isinstance(state.hidden, tuple) else state.hidden
    assert hidden.shape == (layout["decoder_layers"], 3, 10)
    assert isinstance(state.hidden, tuple) == (layout["cell"] == "lstm")


@pytest.mark.parametrize("attention, feeding", [(None, False), ("bahdanau", False),
                                                ("bahdanau", True), ("dot", True)])
def test_teacher_forcing_equals_decoding_step_by_step(attention, feeding):
    model = token_model(attention=attention, input_feeding=feeding, bidirectional=attention != "dot")
    src, lengths, tgt_in = token_batch()
    scores, weights = model(src, lengths, tgt_in)
    memory, state = model.encode(src, lengths)
    steps = []
    for t in range(TGT_LEN):
        step, state, _ = model.decode(tgt_in[:, t:t + 1], state, memory)
        steps.append(step)
    torch.testing.assert_close(torch.cat(steps, 1), scores, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", [None, "bahdanau"])
def test_padding_invariance(attention):
    model = token_model(attention=attention, bidirectional=True, cell="lstm")
    src, lengths, tgt_in = token_batch()
    scores, _ = model(src, lengths, tgt_in)
    for row, n in enumerate(LENGTHS):
        alone, _ = model(src[row:row + 1, :n], lengths[row:row + 1], tgt_in[row:row + 1])
        torch.testing.assert_close(alone[0], scores[row], atol=1e-5, rtol=1e-5)


def test_scheduled_sampling_runs_and_differs_from_teacher_forcing():
    model = token_model(attention="bahdanau")
    src, lengths, tgt_in = token_batch()
    forced, _ = model(src, lengths, tgt_in)
    sampled, weights = model(src, lengths, tgt_in, sampling_ratio=1.0)
    assert sampled.shape == forced.shape and weights.shape == (3, TGT_LEN, max(LENGTHS))
    torch.testing.assert_close(sampled[:, 0], forced[:, 0])  # the first step is always bos
    assert not torch.allclose(sampled[:, 1:], forced[:, 1:])
    # ratio 1 feeds the model's own argmax: the same as greedy decoding with those inputs
    memory, state = model.encode(src, lengths)
    prev, steps = tgt_in[:, :1], []
    for _ in range(TGT_LEN):
        step, state, _ = model.decode(prev, state, memory)
        steps.append(step)
        prev = step.argmax(-1)
    torch.testing.assert_close(torch.cat(steps, 1), sampled, atol=1e-5, rtol=1e-5)


def test_scheduled_sampling_with_vector_targets():
    model = vector_model("onehot", attention="general")
    src = torch.randn(3, max(LENGTHS), FEATURES)
    tgt_in = torch.cat([torch.zeros(3, 1, 4), torch.eye(4)[torch.randint(0, 4, (3, 4))]], 1)
    forced, _ = model(src, torch.tensor(LENGTHS), tgt_in)
    sampled, _ = model(src, torch.tensor(LENGTHS), tgt_in, sampling_ratio=1.0)
    assert sampled.shape == forced.shape == (3, 5, 4)
    assert not torch.allclose(sampled[:, 1:], forced[:, 1:])


def test_prediction_to_input():
    scores = torch.tensor([[[0.1, 2.0, -1.0, 0.5]]])
    assert token_model().prediction_to_input(torch.randn(2, 1, VOCAB)).shape == (2, 1)
    onehot = vector_model("onehot").prediction_to_input(scores)
    assert torch.equal(onehot, torch.tensor([[[0.0, 1.0, 0.0, 0.0]]]))
    assert vector_model("identity").prediction_to_input(scores) is scores


def test_tied_embeddings_share_the_output_weight():
    model = token_model(tie_embeddings=True)
    assert model.generator.weight is model.tgt_embed.weight
    assert token_model(tie_embeddings=False).generator.weight is not model.tgt_embed.weight


def test_bad_construction_raises():
    with pytest.raises(ValueError, match="exactly one of src_vocab/src_features"):
        Seq2Seq(config(), src_vocab=5, src_features=3, tgt_vocab=5)
    with pytest.raises(ValueError, match="exactly one of"):
        Seq2Seq(config(), src_vocab=5)
    with pytest.raises(ValueError, match="vector_feedback must be"):
        Seq2Seq(config(), src_features=3, tgt_features=4, vector_feedback="sample")
    with pytest.raises(ConfigError, match="model.cell must be one of"):
        Seq2Seq(config(cell="transformer"), src_vocab=5, tgt_vocab=5)
    with pytest.raises(ValueError, match="'dot' attention needs equal query and key sizes"):
        Seq2Seq(config(attention="dot", bidirectional=True), src_vocab=5, tgt_vocab=5)


def _decode_steps(model, src, lengths, tgt_in, beams=1, session=None):
    """Decode tgt_in one step at a time through a session; (scores, last step's weights)."""
    session = session or decoding_session(model)
    memory, state = session.encode(src, lengths)
    if beams > 1:  # each sentence's state repeated per beam; memory stays once per sentence
        state = session.reorder_state(state, torch.arange(src.size(0)).repeat_interleave(beams))
        tgt_in = tgt_in.repeat_interleave(beams, 0)
    steps = []
    for t in range(TGT_LEN):
        step, state, weights = session.step(tgt_in[:, t:t + 1], state, memory, beams)
        steps.append(step)
    return torch.cat(steps, 1), None if weights is None else weights[:, 0]


def test_sessions_follow_weight_changes():
    model = token_model(attention="general", input_feeding=False)
    src, lengths, tgt_in = token_batch()
    with torch.no_grad():
        before, _ = _decode_steps(model, src, lengths, tgt_in)
        model.tgt_embed.weight.add_(0.5)  # as an optimizer step between validations
        model.decoder.rnn.weight_ih_l0.mul_(1.5)
        after, _ = _decode_steps(model, src, lengths, tgt_in)
        plain, _ = model(src, lengths, tgt_in)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention, feeding", [("general", False), ("bahdanau", True)])
def test_beams_share_the_memory_of_their_sentence(attention, feeding):
    model = token_model(attention=attention, input_feeding=feeding)
    src, lengths, tgt_in = token_batch()
    with torch.no_grad():
        grouped, weights = _decode_steps(model, src, lengths, tgt_in, beams=3)
        expanded, expanded_weights = _decode_steps(
            model, src.repeat_interleave(3, 0), lengths.repeat_interleave(3), tgt_in.repeat_interleave(3, 0))
    torch.testing.assert_close(grouped, expanded, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights, expanded_weights, atol=1e-6, rtol=1e-5)


def _attributes(model) -> list[dict]:
    """Every module's attributes, as object ids (dicts such as _parameters by their items)."""
    def ids(value):
        return {k: id(v) for k, v in value.items()} if isinstance(value, dict) else id(value)
    return [{name: ids(value) for name, value in vars(module).items()}
            for module in model.modules()]


def test_the_model_holds_no_per_call_state():
    """Decoding leaves every module's attributes as they were: what it made lives in the
    session."""
    model = token_model("bf16", attention="bahdanau", input_feeding=True)
    src, lengths, tgt_in = token_batch()
    before = _attributes(model)
    with torch.no_grad():
        session = decoding_session(model)
        _decode_steps(model, src, lengths, tgt_in, session=session)
    assert session.reduced_weight is not None  # the bf16 copy of the output layer's weight
    assert _attributes(model) == before


@pytest.mark.parametrize("options", [{}, {"precision": "bf16"}, {"quantize": True}],
                         ids=["fp32", "bf16", "int8"])
def test_threads_share_one_translator(trained_model_dir, options):
    """8 threads translating at once with one Translator (each call its own decoding
    session) get exactly the sequential translations, greedy and beam."""
    from concurrent.futures import ThreadPoolExecutor

    from seq2seq.decoding.translator import Translator

    translator = Translator.load(trained_model_dir, device="cpu", **options)
    assert policy(translator.model).bf16_output == ("precision" in options)
    sentences = ["a b c d", "h g f e d c b a", "c c a", "b a", "e f g h a b c d", "d d h"] * 3
    jobs = [(sentences[i:] + sentences[:i], 1 + 2 * (i % 2)) for i in range(8)]
    want = [translator.translate(lines, beam=beam) for lines, beam in jobs]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda job: translator.translate(job[0], beam=job[1]), jobs * 3))
    assert got == want * 3


def test_a_session_needs_eval_mode():
    model = token_model().train()
    for session in (decoding_session, RNNSession):
        with pytest.raises(ValueError, match=r"decode with the model in eval mode \(model.eval\(\)\)"):
            session(model)


@pytest.mark.parametrize("attention, feeding", [("bahdanau", True), ("general", False), (None, False)])
def test_plain_and_fast_sessions_decode_alike(attention, feeding):
    """The two implementations of the decoding interface: the plain session steps in float32,
    the fast one with the output layer's product in bf16, to the same scores within bf16's
    rounding, the same attention weights, and float32 logits again through ``exact_logits``."""
    model = token_model("bf16", attention=attention, input_feeding=feeding)
    src, lengths, tgt_in = token_batch()
    with torch.no_grad():
        fast = decoding_session(model)
        assert isinstance(fast, FastRNNSession) and fast.rounds_scores
        got = _decode_steps(model, src, lengths, tgt_in, beams=2, session=fast)
        want = _decode_steps(model, src, lengths, tgt_in, beams=2, session=RNNSession(model))
        rows, tokens = torch.tensor([[0, 3], [5, 1]]), torch.tensor([[2, 7], [10, 0]])
        exact = fast.exact_logits(rows, tokens)
    torch.testing.assert_close(got[0], want[0], atol=3e-2, rtol=1e-2)
    assert not torch.equal(got[0], want[0])  # rounded
    torch.testing.assert_close(exact, want[0][rows, -1, tokens], atol=1e-5, rtol=1e-5)
    if attention is not None:
        torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-5)


def test_encoder_hidden_size_sets_the_encoder_width_apart_from_the_decoder():
    """OpenNMT-py's brnn layout: a bidirectional encoder of 2 x 6 under a decoder of 10."""
    torch.manual_seed(0)
    model = Seq2Seq(config(hidden_size=10, encoder_hidden_size=6, attention="general",
                           input_feeding=False), src_vocab=VOCAB, tgt_vocab=VOCAB)
    assert model.encoder.rnn.hidden_size == 6 and model.encoder.output_size == 12
    assert model.decoder.rnn.hidden_size == 10
    src, lengths, tgt_in = token_batch()
    scores, weights = model(src, lengths, tgt_in)
    assert scores.shape == (3, TGT_LEN, VOCAB) and weights.shape == (3, TGT_LEN, max(LENGTHS))
    with pytest.raises(ConfigError, match="model.encoder_hidden_size"):
        config(encoder_hidden_size=-1).validate()
    with pytest.raises(ConfigError, match="model.encoder_hidden_size is a setting of model.arch=rnn"):
        ModelConfig(arch="transformer", encoder_hidden_size=6).validate()
