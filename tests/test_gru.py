"""The fused training path of seq2seq.kernels.gru.GRU (FastPaths.fused_gru) must match nn.GRU exactly:
outputs, final state and every gradient, with padding, both directions and several layers;
it runs in training mode with the flag on, and nn.GRU runs otherwise."""

import pytest
import torch
from torch import nn

from seq2seq.kernels.gru import FusedGRU, reverse_index
from seq2seq.kernels.policy import FastPaths
from seq2seq.models.rnn.encoder import run_padded

FUSED = FastPaths(fused_gru=True)


def _run(module, fused: bool, x, lengths, hx):
    module.zero_grad()
    x = x.detach().requires_grad_()
    hx = None if hx is None else hx.detach().requires_grad_()
    if fused:
        out, h_n = module.forward_padded(x, lengths, hx)
    else:
        out, h_n = run_padded(module, x, lengths, hx)
    (out.sin().sum() + h_n.cos().sum()).backward()
    grads = [p.grad.clone() for p in module.parameters()] + [x.grad]
    if hx is not None:
        grads.append(hx.grad)
    return out.detach(), h_n.detach(), grads


@pytest.mark.parametrize("bidirectional,layers", [(True, 2), (False, 1), (True, 1), (False, 3)])
@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("with_hx", [True, False])
def test_fused_path_matches_nn_gru(bidirectional, layers, padded, with_hx):
    torch.manual_seed(0)
    gru = nn.GRU(5, 7, num_layers=layers, batch_first=True, bidirectional=bidirectional).double()
    FusedGRU.install(gru, FUSED, "cpu")
    x = torch.randn(4, 6, 5, dtype=torch.double)
    lengths = torch.tensor([6, 3, 1, 5]) if padded else None
    directions = 2 if bidirectional else 1
    hx = torch.randn(layers * directions, 4, 7, dtype=torch.double) if with_hx else None
    fused = _run(gru, True, x, lengths, hx)
    reference = _run(gru, False, x, lengths, hx)
    torch.testing.assert_close(fused[0], reference[0])
    torch.testing.assert_close(fused[1], reference[1])
    for got, want in zip(fused[2], reference[2]):
        torch.testing.assert_close(got, want)


def test_padded_positions_are_zero_and_do_not_change_results():
    torch.manual_seed(1)
    gru = nn.GRU(3, 4, batch_first=True, bidirectional=True)
    FusedGRU.install(gru, FUSED, "cpu")
    x = torch.randn(2, 5, 3, requires_grad=True)
    out, h_n = gru.forward_padded(x, torch.tensor([5, 2]))
    assert torch.all(out[1, 2:] == 0)
    alone, h_alone = gru.forward_padded(x[1:, :2].detach().requires_grad_(), None)
    torch.testing.assert_close(out[1, :2], alone[0])
    torch.testing.assert_close(h_n[:, 1], h_alone[:, 0])


def _fused_calls(gru: nn.GRU, x: torch.Tensor) -> int:
    """How many nodes of the fused layer Function the output's graph holds."""
    out, _ = gru(x.requires_grad_())
    seen, stack, count = set(), [out.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        count += type(node).__name__ == "_GRULayerFunctionBackward"
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return count


def test_fused_path_runs_in_training_mode_on_the_cpu_only():
    gru = nn.GRU(3, 4, num_layers=2, batch_first=True)
    x = torch.randn(2, 5, 3)
    assert _fused_calls(gru, x) == 0  # a GRU alone: the reference paths
    FusedGRU.install(gru, FUSED, "cpu")
    assert _fused_calls(gru, x) == 2  # one Function per layer
    assert _fused_calls(gru.eval(), x) == 0  # evaluation and decoding: nn.GRU
    gru.train().to("meta")  # off the CPU the twin is nn.GRU, and back on it fused again
    assert not gru.on_cpu
    gru.to_empty(device="cpu")
    assert gru.on_cpu and _fused_calls(gru, x) == 2


def test_the_twin_keeps_nn_grus_parameters_and_state_dict():
    gru = nn.GRU(3, 4, num_layers=2, batch_first=True, bidirectional=True)
    before = gru.state_dict()
    parameters = list(gru.parameters())
    FusedGRU.install(gru, FUSED, "cpu")
    assert gru.state_dict().keys() == before.keys()
    assert all(a is b for a, b in zip(gru.parameters(), parameters, strict=True))
    gru.uninstall()
    assert type(gru) is nn.GRU and not hasattr(gru, "cpu_policy")
    with pytest.raises(TypeError, match="FusedGRU is the twin of GRU, not of LSTM"):
        FusedGRU.install(nn.LSTM(3, 4), FUSED, "cpu")


def test_reverse_index_reverses_within_length():
    index = reverse_index(torch.tensor([3, 1, 4]), 4)
    assert index.t().tolist() == [[2, 1, 0, 3], [0, 1, 2, 3], [3, 2, 1, 0]]
