"""The training kernels' per-step operations on this CPU, one by one: tanh against
``2 sigmoid(2x) - 1``, and one step's products from float32 against bf16 operands.

    python benchmarks/step_ops.py [--batch 64] [--src-len 20] [--size 256]

The step-wise decoder and the fused GRU run these once per time step, so their cost on the
CPU at hand decides what the kernels use (``seq2seq.kernels.ops``): PyTorch's tanh kernel
costs several times its sigmoid on some CPUs and about the same on others. A step's products
from bf16 operands were measured end to end too and dropped (benchmarks/RESULTS.md); the
products here show what one of them saves on this CPU, casts included. Each figure is the
median of ``--repeats`` timings of 200 calls, the variants interleaved so that the machine's
drift hits each alike.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from common import print_header, record
from torch.utils.benchmark import Timer

from seq2seq.kernels.ops import tanh_


def microseconds(fn: Callable[[], object], calls: int = 200) -> float:
    """One call's mean time over ``calls`` calls (torch.utils.benchmark, all torch threads)."""
    timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.timeit(calls).mean * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--src-len", type=int, default=20)
    parser.add_argument("--size", type=int, default=256, help="hidden, attention and output size")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print_header()
    torch.manual_seed(0)
    b, s, n = args.batch, args.src_len, args.size
    gates = torch.randn(b, s, n)  # Bahdanau's keys + W_q q, (batch, source, attention)
    scratch = torch.empty_like(gates)
    small = torch.randn(b, n)  # a GRU candidate or the combine layer, (batch, size)
    small_out = torch.empty_like(small)
    variants: dict[str, Callable[[], object]] = {
        f"tanh_ of ({b}, {s}, {n}), Bahdanau's energy": lambda: scratch.copy_(gates).tanh_(),
        "2 sigmoid(2x) - 1 of the same (ops.tanh_)": lambda: tanh_(scratch.copy_(gates)),
        "sigmoid_ of the same (the energy kept as sigmoid(2x))": lambda: scratch.copy_(gates).sigmoid_(),
        f"tanh_ of ({b}, {n}), a GRU candidate or the combine layer": lambda: small_out.copy_(small).tanh_(),
        "2 sigmoid(2x) - 1 of the same": lambda: tanh_(small_out.copy_(small)),
    }
    for rows, inner, outer in ((b, n, 3 * n), (b, 3 * n, n)):  # W_hh h; a gradient through W_hh
        x, w, bias = torch.randn(rows, inner), torch.randn(inner, outer), torch.randn(outer)
        out, w16 = torch.empty(rows, outer), w.bfloat16()
        name = f"bias + ({rows}, {inner}) @ ({inner}, {outer})"
        variants[f"{name}, float32"] = lambda x=x, w=w, bias=bias, out=out: torch.addmm(bias, x, w, out=out)
        variants[f"{name}, bf16 operands and the casts"] = (
            lambda x=x, w16=w16, bias=bias, out=out: torch.add(bias, x.bfloat16() @ w16, out=out))
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            times[name].append(microseconds(fn))
    rows = [(name, f"{statistics.median(t):.0f} µs") for name, t in times.items()]
    record(f"Per-step operations, batch {b}, source {s}, size {n}", rows)


if __name__ == "__main__":
    main()
