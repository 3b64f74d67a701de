"""The step-wise decoder's training path (``FastPaths.stepwise``): ``StepwiseDecoder``, the
twin of the ``Decoder``, runs all target steps in one autograd Function.

With input feeding each step's input holds the previous step's attentional vector, so the
decoder runs one step at a time. Autograd then records about a hundred small operations per
step and computes every weight gradient as T small matrix products (batch rows) that it adds
up. ``StepwiseDecoder.forward`` computes the same results as ``Decoder``'s step loop for a one-layer GRU
decoder with input feeding and Bahdanau or Luong attention (float32 or float64, on CPU where
it was measured), with a hand-written backward:

- the embedding half of the GRU input projection is one product for all steps;
- one step's forward writes into buffers kept for the backward (no per-step allocations
  recorded by autograd, no concatenations);
- the weight gradients (GRU input and recurrent weights, attention query layer, combine
  layer) are one product each over all T * batch rows, after the backward loop;
- in bf16 (``FastPaths.bf16_products``) that first product and these weight gradients are
  products of bf16 operands; the steps stay float32;
- Bahdanau's ``tanh(x)`` is kept as ``s = sigmoid(2x)`` (``tanh(x) = 2s - 1``): the energy
  ``v . tanh(x)`` becomes ``2v . s`` (the constant ``-sum(v)`` it drops is the same at every
  source position, so the softmax does not see it) and ``tanh'(x) = 4s(1 - s)``. A sigmoid
  costs a fraction of PyTorch's tanh kernel on some CPUs (benchmarks/RESULTS.md).

Target padding is not masked, as in the plain step loop: its outputs meet no loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

from seq2seq.kernels.gru import gru_cell, gru_cell_backward
from seq2seq.kernels.ops import linear_in, matmul_in, tanh_
from seq2seq.kernels.policy import Twin
from seq2seq.models.rnn.attention import BahdanauAttention
from seq2seq.models.rnn.decoder import Decoder, DecoderState, Memory


class StepwiseDecoder(Twin, Decoder):
    """The twin of a one-layer GRU ``Decoder`` with input feeding (``FastPaths.stepwise``):
    in training on the CPU, ``forward`` runs all steps in one autograd Function; otherwise
    it is the ``Decoder``. It reads its own layers' weights in the layout ``decoder.py``
    states (RNN input ``[embedding; fed vector]``, ``combine.weight`` ``[W_h | W_c]``)."""

    plain = Decoder

    def forward(self, inputs: Tensor, state: DecoderState,
                memory: Memory) -> tuple[Tensor, DecoderState, Tensor | None]:
        """``Decoder.forward``: (batch, tgt_len, embed) inputs -> (batch, tgt_len, output)
        attentional vectors, the final state, (batch, tgt_len, src_len) weights in the
        inputs' dtype."""
        if not (self.training and self.on_cpu):
            return super().forward(inputs, state, memory)
        outputs, hidden, weights = run_stepwise(self, inputs, state.hidden, state.feed,
                                                memory.proj_keys, memory.outputs, memory.mask)
        return outputs, DecoderState(hidden, outputs[:, -1]), weights


def run_stepwise(decoder: StepwiseDecoder, inputs: Tensor, hidden: Tensor, feed: Tensor,
                 proj_keys: Tensor, values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Teacher-forced steps of ``decoder`` in one autograd Function.

    Args:
        inputs: (batch, tgt_len, embed) embedded previous tokens.
        hidden: (1, batch, hidden) initial GRU state; feed: (batch, output) initial
            attentional vector.
        proj_keys: (batch, src_len, attention) Bahdanau / (batch, src_len, hidden) Luong keys.
        values: (batch, src_len, key) encoder outputs; mask: (batch, src_len) bool, True at
            real source positions.

    Returns:
        outputs (batch, tgt_len, output) attentional vectors, the final state (1, batch,
        hidden), and attention weights (batch, tgt_len, src_len) in the inputs' dtype.
    """
    rnn, attention = decoder.rnn, decoder.attention
    embed = inputs.size(-1)
    w_ih = rnn.weight_ih_l0
    products = decoder.cpu_policy.products_dtype()
    gates_embed = linear_in(products, inputs.transpose(0, 1), w_ih[:, :embed], rnn.bias_ih_l0)  # (T, B, 3H)
    keep = None  # the query's dropout scale, one mask for all steps
    if decoder.training and decoder.dropout.p > 0:
        shape = (inputs.size(1), inputs.size(0), decoder.hidden_size)
        keep = decoder.dropout(inputs.new_ones(shape))  # nn.Dropout or its twin draws it
    w_query = energy = None  # Luong: the keys are all there is
    if isinstance(attention, BahdanauAttention):
        w_query, energy = attention.query_layer.weight, attention.energy_layer.weight.view(-1)
    outputs, final, weights = _StepwiseGRUFunction.apply(
        gates_embed.to(hidden.dtype).contiguous(), hidden[0], feed, w_ih[:, embed:],
        rnn.weight_hh_l0, rnn.bias_hh_l0, keep, proj_keys, values, mask, w_query, energy,
        decoder.combine.weight, decoder.combine.bias, products)
    return outputs.transpose(0, 1), final.unsqueeze(0), weights.transpose(0, 1)


class _StepwiseGRUFunction(torch.autograd.Function):
    """Inputs (T steps, B sentences, S source positions, H hidden, O output, K key, A
    attention): gates_embed (T, B, 3H) ``W_ih[:, :embed] x + b_ih``; h0 (B, H); f0 (B, O);
    w_feed (3H, O) the input weights of the fed vector; w_hh (3H, H); b_hh (3H); keep
    (T, B, H) dropout scale of the query, or None; proj_keys (B, S, A or H); values
    (B, S, K); mask (B, S); w_query (A, H) and energy (A) for Bahdanau, or None and None for
    Luong (keys already projected); w_combine (O, H + K); b_combine (O); products: the dtype
    of the weight gradients' products (``matmul_in``; None: the inputs').

    Outputs: the attentional vectors (T, B, O), the final state (B, H), the attention
    weights (T, B, S) (not differentiable).
    """

    @staticmethod
    def forward(ctx, gates_embed, h0, f0, w_feed, w_hh, b_hh, keep, proj_keys, values, mask,
                w_query, energy, w_combine, b_combine, products):
        steps, batch = gates_embed.shape[:2]
        size, src_len = h0.size(1), values.size(1)
        bahdanau = w_query is not None
        hs = h0.new_empty(steps, batch, size)  # GRU states
        rz = h0.new_empty(steps, batch, 2 * size)  # reset and update gates
        ns = h0.new_empty(steps, batch, size)  # candidate states
        gh = h0.new_empty(steps, batch, 3 * size)  # W_hh h + b_hh
        query_context = h0.new_empty(steps, batch, size + values.size(2))  # [q; c]
        outs = h0.new_empty(steps, batch, w_combine.size(0))  # attentional vectors
        weights = h0.new_empty(steps, batch, src_len)
        gates = None  # Bahdanau: sigmoid(2 (keys + W_q q)), kept for the backward
        if bahdanau:
            gates = h0.new_empty(steps, batch, src_len, w_query.size(0))
            keys2, w_query2_t, energy2 = 2 * proj_keys, 2 * w_query.t(), 2 * energy
        padding = ~mask
        h, f = h0, f0
        for t in range(steps):
            gi = torch.addmm(gates_embed[t], f, w_feed.t())  # (B, 3H)
            torch.addmm(b_hh, h, w_hh.t(), out=gh[t])
            h = gru_cell(gi, gh[t], h, rz[t], ns[t], out=hs[t])
            query = query_context[t, :, :size]
            if keep is None:
                query.copy_(h)
            else:
                torch.mul(h, keep[t], out=query)
            if bahdanau:
                projected2 = torch.mm(query, w_query2_t)  # (B, A)
                torch.add(keys2, projected2.unsqueeze(1), out=gates[t]).sigmoid_()
                scores = torch.matmul(gates[t], energy2)  # (B, S), less sum(v)
            else:  # a row times the keys transposed (a product with one column is slow)
                scores = torch.bmm(query.unsqueeze(1), proj_keys.transpose(1, 2)).squeeze(1)
            weights[t] = torch.softmax(scores.masked_fill_(padding, float("-inf")), -1)
            query_context[t, :, size:] = torch.bmm(weights[t].unsqueeze(1), values).squeeze(1)
            tanh_(torch.addmm(b_combine, query_context[t], w_combine.t(), out=outs[t]))
            f = outs[t]
        ctx.save_for_backward(h0, f0, w_feed, w_hh, keep, proj_keys, values, w_query, energy,
                              w_combine, hs, rz, ns, gh[..., 2 * size:], query_context, outs,
                              weights, gates)
        ctx.mark_non_differentiable(weights)
        ctx.products = products
        return outs, hs[-1].clone(), weights

    @staticmethod
    def backward(ctx, grad_outs, grad_final, _grad_weights):
        (h0, f0, w_feed, w_hh, keep, proj_keys, values, w_query, energy, w_combine, hs, rz,
         ns, ghn, query_context, outs, weights, gates) = ctx.saved_tensors
        steps, batch, size = hs.shape
        bahdanau = w_query is not None
        if grad_outs is None:
            grad_outs = torch.zeros_like(outs)
        dh = torch.zeros_like(h0) if grad_final is None else grad_final.clone()
        df = torch.zeros_like(f0)
        d_pre_combine = torch.empty_like(outs)  # through the combine layer's tanh
        d_gates_in = h0.new_empty(steps, batch, 3 * size)  # grad of W_ih x + b_ih
        d_gates_hh = torch.empty_like(d_gates_in)  # grad of W_hh h + b_hh
        d_context = h0.new_empty(steps, batch, values.size(2))
        d_scores = torch.empty_like(weights)
        d_projected = h0.new_empty(steps, batch, w_query.size(0)) if bahdanau else None
        d_proj_keys = torch.zeros_like(proj_keys) if bahdanau else None
        energy4 = 4 * energy if bahdanau else None
        for t in range(steps - 1, -1, -1):
            torch.ops.aten.tanh_backward.grad_input(grad_outs[t] + df, outs[t],
                                                    grad_input=d_pre_combine[t])
            d_query_context = torch.mm(d_pre_combine[t], w_combine)  # (B, H + K)
            d_query = d_query_context[:, :size]
            d_context[t] = d_query_context[:, size:]
            w = weights[t]
            d_w = torch.bmm(d_context[t].unsqueeze(1), values.transpose(1, 2)).squeeze(1)  # (B, S)
            d_w -= (w * d_w).sum(1, keepdim=True)
            torch.mul(w, d_w, out=d_scores[t])  # softmax backward; 0 at padding
            if bahdanau:
                # d_pre = d_scores * v * tanh' = d_scores * 4v * s(1 - s), 4v applied after the sums
                d_pre = torch.ops.aten.sigmoid_backward(d_scores[t].unsqueeze(2), gates[t])  # (B, S, A)
                d_proj_keys += d_pre
                torch.sum(d_pre, 1, out=d_projected[t])
                d_projected[t] *= energy4
                d_query = torch.addmm(d_query, d_projected[t], w_query)
            else:
                d_query = d_query + torch.bmm(d_scores[t].unsqueeze(1), proj_keys).squeeze(1)
            dh = dh + (d_query if keep is None else d_query * keep[t])
            # the GRU cell
            h_prev = hs[t - 1] if t > 0 else h0
            direct = gru_cell_backward(dh, h_prev, rz[t], ns[t], ghn[t], d_gates_hh[t],
                                       d_gates_in[t, :, 2 * size:])
            d_gates_in[t, :, :2 * size] = d_gates_hh[t, :, :2 * size]
            dh = torch.addmm(direct, d_gates_hh[t], w_hh)
            df = torch.mm(d_gates_in[t], w_feed)

        def rows(x: Tensor) -> Tensor:  # (T, B, n) -> (T * B, n)
            return x.reshape(-1, x.size(-1))

        def weight_grad(grad: Tensor, x: Tensor) -> Tensor:  # sum over steps of grad^T x
            return matmul_in(ctx.products, rows(grad).t(), rows(x))

        prev_h = torch.cat([h0.unsqueeze(0), hs[:-1]], 0)
        prev_f = torch.cat([f0.unsqueeze(0), outs[:-1]], 0)
        query = query_context[..., :size]
        grads = dict(
            gates_embed=d_gates_in, h0=dh, f0=df,
            w_feed=weight_grad(d_gates_in, prev_f),
            w_hh=weight_grad(d_gates_hh, prev_h), b_hh=rows(d_gates_hh).sum(0),
            values=torch.bmm(weights.permute(1, 2, 0), d_context.transpose(0, 1)),
            w_combine=weight_grad(d_pre_combine, query_context),
            b_combine=rows(d_pre_combine).sum(0))
        if bahdanau:
            grads["proj_keys"] = d_proj_keys.mul_(energy4)
            grads["w_query"] = weight_grad(d_projected, query)
            # v's: the sum of tanh * d_scores, tanh = 2s - 1
            grads["energy"] = rows(gates).t().mv(d_scores.reshape(-1)).mul_(2).sub_(d_scores.sum())
        else:
            grads["proj_keys"] = torch.bmm(d_scores.permute(1, 2, 0), query.transpose(0, 1))
        names = ("gates_embed", "h0", "f0", "w_feed", "w_hh", "b_hh", "keep", "proj_keys",
                 "values", "mask", "w_query", "energy", "w_combine", "b_combine", "products")
        return tuple(grads.get(name) if needed else None
                     for name, needed in zip(names, ctx.needs_input_grad))
