"""A GRU for CPU training: whole-sequence backward, with the weight gradients in one product.

PyTorch fuses the LSTM's training on CPU (oneDNN) but not the GRU's: autograd records each
time step's gate arithmetic and computes each step's weight gradient as a small matrix
product (batch rows) that it then adds up. ``FusedGRU``, the twin of ``nn.GRU``, keeps its
parameters and results and, in training mode on the CPU, changes how they are computed:

- the input projections of all steps are one matrix product before the loop, and their
  gradients one product after it;
- the recurrent weight gradient is one product over all steps (``(3H, T*B) @ (T*B, H)``)
  instead of T small ones;
- both directions of a bidirectional layer step together, as one batched product;
- padding is handled with masks (a sequence's state freezes after its last position), so
  padded batches need no packing;
- in bf16 (``FastPaths.bf16_products``) the input projections and the weight gradient are
  products of bf16 operands; the recurrence stays float32.
- between layers it drops with ``dropout.dropout``: ``FastPaths.uniform_dropout``'s masks
  where that path is on, ``F.dropout``'s otherwise.

Otherwise it is ``nn.GRU``. ``FusedEncoder``, the twin of the ``Encoder``, runs a padded
batch through it with masks instead of packing it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from seq2seq.kernels.dropout import dropout
from seq2seq.kernels.ops import linear_in, matmul_in, tanh_
from seq2seq.kernels.policy import Twin
from seq2seq.models.rnn.encoder import Encoder, State, run_padded


def gru_cell(gi: Tensor, gh: Tensor, h: Tensor, rz: Tensor, n: Tensor,
             out: Tensor | None = None) -> Tensor:
    """One GRU step's gate arithmetic, in PyTorch's gate order (reset, update, candidate).

    Args:
        gi: (..., 3H) ``W_ih x + b_ih``; gh: (..., 3H) ``W_hh h + b_hh``; h: (..., H).
        rz, n: (..., 2H) and (..., H) buffers that receive the reset and update gates and
            the candidate state (the backward pass needs them).
        out: where the new state goes, or None for a new tensor.

    Returns:
        the new state ``n + z * (h - n)``.
    """
    size = h.size(-1)
    torch.add(gi[..., :2 * size], gh[..., :2 * size], out=rz).sigmoid_()
    tanh_(torch.addcmul(gi[..., 2 * size:], rz[..., :size], gh[..., 2 * size:], out=n))
    if out is None:
        return torch.lerp(n, h, rz[..., size:])
    return torch.lerp(n, h, rz[..., size:], out=out)


def gru_cell_backward(dh: Tensor, h_prev: Tensor, rz: Tensor, n: Tensor, ghn: Tensor,
                      grad_gh: Tensor, grad_gin: Tensor) -> Tensor:
    """Back through one ``gru_cell`` step, given ``dh``, the gradient of its new state.

    Writes the gradient of ``gh`` into ``grad_gh`` (..., 3H) and that of ``gi``'s candidate
    part into ``grad_gin`` (..., H); ``gi``'s reset and update parts have ``grad_gh``'s.
    ``ghn`` is the candidate part of ``gh``. Returns ``dh * z``: the previous state's
    gradient apart from what flows back through ``W_hh`` (``grad_gh @ W_hh``).
    """
    size = n.size(-1)
    r, z = rz[..., :size], rz[..., size:]
    dz_h = dh * z  # what flows to h_prev directly
    dn = torch.ops.aten.tanh_backward.grad_input(dh - dz_h, n, grad_input=grad_gin)
    torch.mul(dn, ghn, out=grad_gh[..., :size])  # d r, before the sigmoid
    torch.mul(dh, h_prev - n, out=grad_gh[..., size:2 * size])  # d z, before the sigmoid
    rz_grad = grad_gh[..., :2 * size]
    torch.ops.aten.sigmoid_backward.grad_input(rz_grad, rz, grad_input=rz_grad)
    torch.mul(dn, r, out=grad_gh[..., 2 * size:])
    return dz_h


def _padded_steps(mask: Tensor | None, steps: int) -> list[bool]:
    """For each step, whether some sequence is padding there (mask: (T, B) or None); steps
    without padding skip the masking."""
    if mask is None:
        return [False] * steps
    return (~mask.all(1)).tolist()


class _GRULayerFunction(torch.autograd.Function):
    """The recurrence of one GRU layer, all directions stepping together.

    Inputs: gi (T, D, B, 3H) input projections with their bias (direction d's sequence
    already in its own reading order), h0 (D, B, H), w_hh (D, 3H, H), b_hh (D, 3H),
    mask (T, B) bool or None (True at real positions, in each direction's reading order
    it is the same: real positions first), products: the dtype of the weight gradient's
    product (``matmul_in``; None: float32). Output: hs (T, D, B, H), the state after each step.
    """

    @staticmethod
    def forward(ctx, gi: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Tensor,
                mask: Tensor | None, products: torch.dtype | None) -> Tensor:
        steps, size = gi.size(0), h0.size(-1)
        w_t = w_hh.transpose(1, 2)  # (D, H, 3H)
        bias = b_hh.unsqueeze(1)  # (D, 1, 3H)
        hs = gi.new_empty(steps, *h0.shape)
        rz = gi.new_empty(steps, h0.size(0), h0.size(1), 2 * size)
        ns = torch.empty_like(hs)
        gh = gi.new_empty(steps, h0.size(0), h0.size(1), 3 * size)
        h = h0
        padded = _padded_steps(mask, steps)
        for t in range(steps):  # results go straight into the saved buffers (out=)
            torch.baddbmm(bias, h, w_t, out=gh[t])  # (D, B, 3H)
            if not padded[t]:
                gru_cell(gi[t], gh[t], h, rz[t], ns[t], out=hs[t])
            else:  # padding: the state stays
                torch.where(mask[t].view(1, -1, 1), gru_cell(gi[t], gh[t], h, rz[t], ns[t]), h,
                            out=hs[t])
            h = hs[t]
        ctx.save_for_backward(h0, w_hh, hs, rz, ns, gh[..., 2 * size:], mask)
        ctx.products = products
        return hs

    @staticmethod
    def backward(ctx, grad_hs: Tensor):
        h0, w_hh, hs, rz, ns, ghn, mask = ctx.saved_tensors
        steps, directions, batch, size = hs.shape
        # direction-major, so that each direction's T * B rows are one matrix after the loop
        grad_gh = grad_hs.new_empty(directions, steps, batch, 3 * size)
        grad_gin = grad_hs.new_empty(directions, steps, batch, size)  # n-gate part of grad gi
        dh = torch.zeros_like(h0)
        padded = _padded_steps(mask, steps)
        for t in range(steps - 1, -1, -1):
            dh = dh + grad_hs[t]
            h_prev = hs[t - 1] if t > 0 else h0
            if padded[t]:
                real = mask[t].view(1, -1, 1)
                frozen = torch.where(real, 0.0, dh)  # padding: the state passes through
                dh = torch.where(real, dh, 0.0)
            direct = gru_cell_backward(dh, h_prev, rz[t], ns[t], ghn[t], grad_gh[:, t],
                                       grad_gin[:, t])
            dh = torch.baddbmm(direct, grad_gh[:, t], w_hh)  # (D, B, H)
            if padded[t]:
                dh = dh + frozen
        prev = hs.new_empty(directions, steps, batch, size)  # the state before each step
        prev[:, 0] = h0
        prev[:, 1:] = hs[:-1].transpose(0, 1)
        flat_gh = grad_gh.view(directions, -1, 3 * size)  # (D, T*B, 3H)
        grad_w = matmul_in(ctx.products, flat_gh.transpose(1, 2),
                           prev.view(directions, -1, size))  # (D, 3H, H)
        grad_b = flat_gh.sum(1)
        grad_gh[..., 2 * size:] = grad_gin  # grad gi: grad gh but for the candidate part
        grad_gi = grad_gh.transpose(0, 1)  # (T, D, B, 3H)
        return grad_gi, dh, grad_w, grad_b, None, None


def reverse_index(lengths: Tensor, steps: int) -> Tensor:
    """(T, B) time index that reverses each sequence within its length, padding in place."""
    t = torch.arange(steps, device=lengths.device).unsqueeze(1)  # (T, 1)
    last = lengths.to(t.device).unsqueeze(0) - 1  # (1, B)
    return torch.where(t <= last, last - t, t)


class FusedGRU(Twin, nn.GRU):
    """The twin of a batch-first ``nn.GRU``: same parameters and results, with a fused
    training path on the CPU for whole sequences (``forward`` of more than one step, and
    ``forward_padded``)."""

    plain = nn.GRU

    @property
    def fused(self) -> bool:
        return self.training and self.on_cpu and self.batch_first

    def forward(self, input: Tensor, hx: Tensor | None = None):  # noqa: A002 (nn.GRU's name)
        if self.fused and isinstance(input, Tensor) and input.size(1) > 1:
            return self.forward_padded(input, None, hx)
        return super().forward(input, hx)

    def forward_padded(self, inputs: Tensor, lengths: Tensor | None = None,
                       hx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Run over a padded batch.

        Args:
            inputs: (batch, steps, input_size).
            lengths: (batch,) real lengths (each >= 1), or None when nothing is padded.
            hx: (layers * directions, batch, hidden) initial state, or None for zeros.

        Returns:
            outputs: (batch, steps, directions * hidden), zeros at padded positions.
            h_n: (layers * directions, batch, hidden), each sequence's state after its last
                real position.
        """
        if not self.fused:
            return run_padded(self, inputs, lengths, hx)
        batch, steps, device = inputs.size(0), inputs.size(1), inputs.device
        directions = 2 if self.bidirectional else 1
        padded = lengths is not None and bool((lengths < steps).any())
        mask = index = None
        if padded:
            positions = torch.arange(steps, device=inputs.device).unsqueeze(1)
            mask = positions < lengths.to(inputs.device).unsqueeze(0)  # (T, B)
        if directions == 2:
            index = (reverse_index(lengths, steps) if padded
                     else torch.arange(steps - 1, -1, -1, device=inputs.device).unsqueeze(1)
                     .expand(steps, batch))
        if hx is None:
            hx = inputs.new_zeros(self.num_layers * directions, batch, self.hidden_size)
        layer_input = inputs.transpose(0, 1)  # (T, B, input_size)
        products = self.cpu_policy.products_dtype()
        finals = []
        for layer in range(self.num_layers):
            if layer > 0:
                layer_input = dropout(layer_input, self.dropout, self.training,
                                      self.cpu_policy.uniform_dropout)
            weights = [self._weights(layer, d) for d in range(directions)]
            gi = [linear_in(products, layer_input, w_ih, b_ih) for w_ih, _, b_ih, _ in weights]
            if directions == 2:  # the backward direction reads each sequence reversed
                gi[1] = gi[1].gather(0, index.unsqueeze(-1).expand_as(gi[1]))
            h0 = hx[layer * directions:(layer + 1) * directions]
            with torch.autocast(device.type, enabled=False):  # the recurrence stays float32
                dtype = torch.promote_types(gi[0].dtype, torch.float32)
                hs = _GRULayerFunction.apply(
                    torch.stack(gi, 1).to(dtype), h0.to(dtype), torch.stack([w[1] for w in weights]),
                    torch.stack([w[3] for w in weights]), mask, products)  # (T, D, B, H)
            finals.append(hs[-1])
            outs = [hs[:, 0]]
            if directions == 2:
                outs.append(hs[:, 1].gather(0, index.unsqueeze(-1).expand_as(hs[:, 1])))
            layer_input = torch.cat(outs, -1) if directions == 2 else outs[0]
        outputs = layer_input
        if mask is not None:
            outputs = outputs * mask.unsqueeze(-1)
        return outputs.transpose(0, 1), torch.cat(finals, 0)

    def _weights(self, layer: int, direction: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(w_ih, w_hh, b_ih, b_hh) of one layer and direction."""
        suffix = f"_l{layer}" + ("_reverse" if direction else "")
        return (getattr(self, "weight_ih" + suffix), getattr(self, "weight_hh" + suffix),
                getattr(self, "bias_ih" + suffix), getattr(self, "bias_hh" + suffix))


class FusedEncoder(Twin, Encoder):
    """The twin of an ``Encoder`` whose RNN is a ``FusedGRU``: in training on the CPU the
    padded batch goes through the fused GRU with masks, not packed."""

    plain = Encoder

    def run_rnn(self, inputs: Tensor, lengths: Tensor) -> tuple[Tensor, State]:
        if isinstance(self.rnn, FusedGRU) and self.on_cpu:
            return self.rnn.forward_padded(inputs, lengths)
        return super().run_rnn(inputs, lengths)
