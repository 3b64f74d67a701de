"""The fused step-wise decoder (input feeding, CPU training) must match the decoder's plain
step loop: the loss, the attention weights and the gradient of every parameter."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from seq2seq import stepwise
from seq2seq.config import ModelConfig
from seq2seq.model import Seq2Seq

VOCAB, LENGTHS, TGT_LEN = 13, [7, 3, 5, 1], 6


def _model(attention: str, dropout: float, **kwargs) -> Seq2Seq:
    torch.manual_seed(0)
    if attention == "dot":  # query and keys of one size
        kwargs.setdefault("bidirectional", False)
    config = ModelConfig(embed_size=6, hidden_size=8, attention=attention, input_feeding=True,
                         dropout=dropout, **kwargs)
    return Seq2Seq(config, src_vocab=VOCAB, tgt_vocab=VOCAB).double().train()


def _batch():
    g = torch.Generator().manual_seed(1)
    src = torch.randint(3, VOCAB, (len(LENGTHS), max(LENGTHS)), generator=g)
    for row, n in enumerate(LENGTHS):
        src[row, n:] = 0
    tgt = torch.randint(3, VOCAB, (len(LENGTHS), TGT_LEN + 1), generator=g)
    tgt[:, 0] = 1
    tgt[2, 4:] = 0  # target padding
    return src, torch.tensor(LENGTHS), tgt[:, :-1], tgt[:, 1:]


class _FixedDropout(nn.Module):
    """Multiplies step t's (batch, 1, hidden) query by keep[t]: the plain loop's dropout
    with the masks that the fused path is given."""

    def __init__(self, keep: torch.Tensor) -> None:
        super().__init__()
        self.keep, self.step, self.p = keep, 0, 0.5

    def forward(self, x):
        out = x * self.keep[self.step].unsqueeze(1)
        self.step += 1
        return out


def _loss_and_grads(model, fused: bool, monkeypatch, keep=None):
    src, lengths, tgt_in, tgt_out = _batch()
    with monkeypatch.context() as patch:
        if not fused:
            patch.setattr(stepwise, "applies", lambda *args: False)
            if keep is not None:
                patch.setattr(model.decoder, "dropout", _FixedDropout(keep))
        elif keep is not None:
            patch.setattr(stepwise, "dropout_scale", lambda *args: keep)
        model.zero_grad()
        loss, weights = model(src, lengths, tgt_in, tgt_out=tgt_out, label_smoothing=0.1)
        (loss * 1.3).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), weights.detach(), grads


@pytest.mark.parametrize("attention", ["bahdanau", "general", "dot"])
@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_fused_matches_step_loop(attention, dropout, monkeypatch):
    model = _model(attention, dropout)
    model.embed_dropout.p = 0.0  # the embedding dropout is not part of the comparison
    model.encoder.dropout.p = 0.0
    keep = None
    if dropout:
        g = torch.Generator().manual_seed(2)
        keep = (torch.rand(TGT_LEN, len(LENGTHS), 8, generator=g) > 0.5).double() * 2
    src, lengths, tgt_in, _ = _batch()
    inputs = model.embed_target(tgt_in)
    memory, state = model.encode(src, lengths)
    assert stepwise.applies(model.decoder, inputs, state.hidden, 1)

    fused = _loss_and_grads(model, True, monkeypatch, keep)
    plain = _loss_and_grads(model, False, monkeypatch, keep)
    torch.testing.assert_close(fused[0], plain[0])
    torch.testing.assert_close(fused[1], plain[1])
    assert fused[2].keys() == plain[2].keys()
    for name in plain[2]:  # float64, but the plain loop rounds the attention softmax to float32
        torch.testing.assert_close(fused[2][name], plain[2][name], rtol=1e-6, atol=1e-6,
                                   msg=name)


def test_outputs_and_final_state_match(monkeypatch):
    """Decoder.forward's own results (not only the loss) are those of the plain loop."""
    model = _model("bahdanau", 0.0)
    src, lengths, tgt_in, _ = _batch()
    memory, state = model.encode(src, lengths)
    inputs = model.embed_target(tgt_in)
    out, new_state, weights = model.decoder(inputs, state, memory)
    with monkeypatch.context() as patch:
        patch.setattr(stepwise, "applies", lambda *args: False)
        ref_out, ref_state, ref_weights = model.decoder(inputs, state, memory)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(new_state.hidden, ref_state.hidden)
    torch.testing.assert_close(new_state.feed, ref_state.feed)
    torch.testing.assert_close(weights, ref_weights)
    # a gradient through the final state alone reaches the parameters as in the plain loop
    grads = []
    for fused in (True, False):
        with monkeypatch.context() as patch:
            if not fused:
                patch.setattr(stepwise, "applies", lambda *args: False)
            model.zero_grad()
            memory, state = model.encode(src, lengths)
            _, final, _ = model.decoder(model.embed_target(tgt_in), state, memory)
            final.hidden.sum().backward()
        grads.append([p.grad.clone() for p in model.decoder.rnn.parameters()])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)


def test_not_used_where_it_does_not_apply():
    model = _model("bahdanau", 0.0)
    src, lengths, tgt_in, _ = _batch()
    inputs = model.embed_target(tgt_in)
    memory, state = model.encode(src, lengths)
    with torch.no_grad():
        assert not stepwise.applies(model.decoder, inputs, state.hidden, 1)  # no training
    assert not stepwise.applies(model.decoder, inputs, state.hidden, 3)  # beams
    lstm = _model("bahdanau", 0.0, cell="lstm")
    memory, state = lstm.encode(src, lengths)
    assert not stepwise.applies(lstm.decoder, lstm.embed_target(tgt_in), state.hidden, 1)
    two_layers = _model("bahdanau", 0.0, decoder_layers=2)
    memory, state = two_layers.encode(src, lengths)
    assert not stepwise.applies(two_layers.decoder, two_layers.embed_target(tgt_in),
                                state.hidden, 1)


def test_dropout_masks_are_drawn_for_every_step(monkeypatch):
    """With dropout, the fused path scales each step's query by its own mask (so two steps
    with the same input differ), and evaluation mode draws none."""
    model = _model("general", 0.5)
    drawn = []
    real = stepwise.dropout_scale

    def spy(shape, p, *args):
        drawn.append((tuple(shape), p))
        return real(shape, p, *args)

    monkeypatch.setattr(stepwise, "dropout_scale", spy)
    src, lengths, tgt_in, tgt_out = _batch()
    model(src, lengths, tgt_in, tgt_out=tgt_out)
    assert drawn == [((TGT_LEN, len(LENGTHS), 8), 0.5)]
    model.eval()
    model(src, lengths, tgt_in, tgt_out=tgt_out)
    assert len(drawn) == 1
