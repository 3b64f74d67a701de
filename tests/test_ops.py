"""seq2seq.kernels.ops: the fast tanh gives tanh's values and gradient; the fast dropout drops at its
rate, scales what it keeps, and repeats under a seed; freed memory is reused; the oneDNN
product runs oneDNN's kernel where it applies, F.linear elsewhere, with F.linear's values."""

import os
import subprocess
import sys

import pytest
import torch

from seq2seq.kernels.ops import FastDropout, FastTanh, cpu_linear, dropout, tanh_
from seq2seq.kernels.policy import REFERENCE, private_ops


def twin(plain: torch.nn.Module, cls, device_type: str = "cpu") -> torch.nn.Module:
    cls.install(plain, REFERENCE, device_type)
    return plain


def fast_tanh(x):
    return twin(torch.nn.Tanh(), FastTanh)(x)


def fast_dropout(x, p, training):
    return dropout(x, p, training, fast=True)


def ops_run(fn, *args) -> set[str]:
    """The names of the torch ops that ``fn(*args)`` runs."""
    with torch.autograd.profiler.profile() as prof:
        fn(*args)
    return {event.name for event in prof.function_events}


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 3e-7), (torch.float64, 1e-15)])
def test_tanh_values(dtype, tol):
    x = torch.cat([torch.linspace(-30, 30, 10_001, dtype=dtype),
                   torch.tensor([0.0, 1e-30, -1e-8, float("inf"), float("-inf")], dtype=dtype)])
    want = torch.tanh(x)
    assert (fast_tanh(x) - want).abs().max() <= tol
    assert (tanh_(x.clone()) - want).abs().max() <= tol
    assert fast_tanh(torch.tensor([float("nan")], dtype=dtype)).isnan().all()


def test_fast_tanh_leaves_its_input_and_has_tanh_gradient():
    x = torch.randn(50, 7, dtype=torch.double, requires_grad=True)
    before = x.detach().clone()
    y = fast_tanh(x)
    assert torch.equal(x.detach(), before)
    (y * torch.arange(7.0, dtype=torch.double)).sum().backward()
    want = (1 - torch.tanh(before) ** 2) * torch.arange(7.0, dtype=torch.double)
    torch.testing.assert_close(x.grad, want)
    assert torch.autograd.gradcheck(fast_tanh, (torch.randn(4, 3, dtype=torch.double,
                                                            requires_grad=True),))


def test_tanh_runs_sigmoid_only_in_the_twin_on_the_cpu():
    x = torch.randn(10)
    assert "aten::sigmoid_" in ops_run(fast_tanh, x) and "aten::tanh" not in ops_run(fast_tanh, x)
    plain = torch.nn.Tanh()
    assert "aten::tanh" in ops_run(plain, x) and "aten::sigmoid_" not in ops_run(plain, x)
    elsewhere = twin(torch.nn.Tanh(), FastTanh, "cuda")  # decided for a GPU: torch.tanh
    assert "aten::tanh" in ops_run(elsewhere, x) and torch.equal(elsewhere(x), torch.tanh(x))


def test_fast_dropout_rate_and_scale():
    torch.manual_seed(0)
    x = torch.ones(200_000)
    y = fast_dropout(x, 0.3, True)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.01
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.7))
    assert fast_dropout(x, 0.3, False) is x
    torch.manual_seed(5)
    a = fast_dropout(x, 0.5, True)
    torch.manual_seed(5)
    assert torch.equal(a, fast_dropout(x, 0.5, True))  # seeded: resumes repeat exactly


def test_dropout_twin_draws_fast_masks_on_the_cpu_only():
    torch.manual_seed(0)
    x = torch.ones(1000)
    drop = torch.nn.Dropout(0.5)
    assert "aten::bernoulli_" in ops_run(drop, x)  # the plain module: F.dropout
    twin(drop, FastDropout)
    assert "aten::random_" in ops_run(drop, x) and "aten::bernoulli_" not in ops_run(drop, x)
    assert "aten::bernoulli_" in ops_run(twin(torch.nn.Dropout(0.5), FastDropout, "cuda"), x)


def test_fast_dropout_gradient_is_the_mask():
    torch.manual_seed(0)
    x = torch.randn(1000, requires_grad=True)
    y = fast_dropout(x, 0.4, True)
    y.sum().backward()
    torch.testing.assert_close(x.grad, (y.detach() != 0).float() / 0.6)


_FAULTS = """
import ctypes, resource
from seq2seq.kernels.ops import keep_freed_memory
print(keep_freed_memory())
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
for _ in range(3):  # a 64 MiB buffer made, written and freed, as a training step's scores
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(64 << 20)
    libc.memset(block, 1, 64 << 20)
    libc.free(block)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(keep: bool) -> tuple[str, list[int]]:
    env = dict(os.environ, SEQ2SEQ_KEEP_FREED_MEMORY="1" if keep else "0")
    out = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0], [int(x) for x in out[1:]]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_keep_freed_memory_saves_page_faults():
    """glibc's default maps a 64 MiB block afresh each time and faults on all 16,384 of its
    pages; with keep_freed_memory the second and third blocks reuse the first one's pages.
    SEQ2SEQ_KEEP_FREED_MEMORY=0 turns the setting off."""
    applied, kept = _page_faults(True)
    off, default = _page_faults(False)
    assert (applied, off) == ("True", "False")
    assert min(default) > 16_000
    assert kept[0] > 16_000 and max(kept[1:]) < 100


@pytest.mark.skipif("onednn_linear" not in private_ops(), reason="this torch has no oneDNN")
@pytest.mark.parametrize("bias", [True, False])
def test_cpu_linear_runs_onednn_where_it_applies(bias):
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(37, 48, generator=g), torch.randn(300, 48, generator=g)
    b = torch.randn(300, generator=g) if bias else None
    want = torch.nn.functional.linear(x, weight, b)
    assert "mkldnn::_linear_pointwise" in ops_run(cpu_linear, x, weight, b)
    torch.testing.assert_close(cpu_linear(x, weight, b), want)
    # where it falls back to F.linear: a strided x or weight, float64, no rows
    wide = torch.cat([weight, weight], 1)
    for args in [(x.t().contiguous().t(), weight, b), (x, wide[:, :48], b),
                 (x.double(), weight.double(), None if b is None else b.double()),
                 (x[:0], weight, b)]:
        ran = ops_run(cpu_linear, *args)
        assert "aten::linear" in ran and "mkldnn::_linear_pointwise" not in ran
        torch.testing.assert_close(cpu_linear(*args), torch.nn.functional.linear(*args))
