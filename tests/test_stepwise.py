"""The fused step-wise decoder (FastPaths.stepwise) must match the decoder's plain step loop:
the loss, the attention weights and the gradient of every parameter; its dropout mask is
``F.dropout``'s, one for all steps; it runs in training mode only."""

from __future__ import annotations

import pytest
import torch
from conftest import autograd_nodes
from torch import nn
from torch.nn import functional as F

from seq2seq.config import ModelConfig
from seq2seq.kernels import apply as apply_kernels
from seq2seq.kernels.policy import REFERENCE, FastPaths
from seq2seq.models.rnn.model import Seq2Seq

VOCAB, LENGTHS, TGT_LEN = 13, [7, 3, 5, 1], 6
STEPWISE = FastPaths(stepwise=True)


def _model(attention: str, dropout: float, **kwargs) -> Seq2Seq:
    torch.manual_seed(0)
    if attention == "dot":  # query and keys of one size
        kwargs.setdefault("bidirectional", False)
    config = ModelConfig(embed_size=6, hidden_size=8, attention=attention, input_feeding=True,
                         dropout=dropout, **kwargs)
    model = Seq2Seq(config, src_vocab=VOCAB, tgt_vocab=VOCAB).double().train()
    model.embed_dropout.p = 0.0  # the decoder's dropout alone is compared
    model.encoder.dropout.p = 0.0
    return model


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
    with the masks that the fused path drew."""

    def __init__(self, keep: torch.Tensor) -> None:
        super().__init__()
        self.keep, self.step, self.p = keep, 0, 0.5

    def forward(self, x):
        out = x * self.keep[self.step].unsqueeze(1)
        self.step += 1
        return out


def _loss_and_grads(model, paths: FastPaths):
    src, lengths, tgt_in, tgt_out = _batch()
    apply_kernels(model, paths)
    model.zero_grad()
    torch.manual_seed(3)
    loss, weights = model(src, lengths, tgt_in, tgt_out=tgt_out, label_smoothing=0.1)
    (loss * 1.3).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), weights.detach(), grads


@pytest.mark.parametrize("attention", ["bahdanau", "general", "dot"])
@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_fused_matches_step_loop(attention, dropout):
    model = _model(attention, dropout)
    fused = _loss_and_grads(model, STEPWISE)
    if dropout:  # the fused path's mask, drawn under the same seed, given to the plain loop
        torch.manual_seed(3)
        keep = F.dropout(torch.ones(TGT_LEN, len(LENGTHS), 8, dtype=torch.float64), dropout)
        model.decoder.dropout = _FixedDropout(keep)
    plain = _loss_and_grads(model, REFERENCE)
    torch.testing.assert_close(fused[0], plain[0])
    torch.testing.assert_close(fused[1], plain[1])
    assert fused[2].keys() == plain[2].keys()
    for name in plain[2]:  # float64: the same to rounding
        torch.testing.assert_close(fused[2][name], plain[2][name], rtol=1e-10, atol=1e-10,
                                   msg=name)


def test_outputs_and_final_state_match():
    """Decoder.forward's own results (not only the loss) are those of the plain loop, and a
    gradient through the final state alone reaches the parameters as in the plain loop."""
    model = _model("bahdanau", 0.0)
    src, lengths, tgt_in, _ = _batch()
    results = []
    for paths in (STEPWISE, REFERENCE):
        apply_kernels(model, paths)
        model.zero_grad()
        memory, state = model.encode(src, lengths)
        out, final, weights = model.decoder(model.embed_target(tgt_in), state, memory)
        assert ("_StepwiseGRUFunctionBackward" in autograd_nodes(out)) == (paths is STEPWISE)
        final.hidden.sum().backward()
        grads = [p.grad.clone() for p in model.decoder.rnn.parameters()]
        results.append((out, final.hidden, final.feed, weights, grads))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


def test_used_in_training_mode_only_and_draws_masks_only_there():
    model = _model("general", 0.5)
    apply_kernels(model, STEPWISE)
    src, lengths, tgt_in, tgt_out = _batch()
    before = torch.get_rng_state()
    loss, _ = model(src, lengths, tgt_in, tgt_out=tgt_out)
    assert "_StepwiseGRUFunctionBackward" in autograd_nodes(loss)
    assert not torch.equal(before, torch.get_rng_state())  # a dropout mask was drawn
    model.eval()
    before = torch.get_rng_state()
    loss, _ = model(src, lengths, tgt_in, tgt_out=tgt_out)
    assert "_StepwiseGRUFunctionBackward" not in autograd_nodes(loss)
    assert torch.equal(before, torch.get_rng_state())
