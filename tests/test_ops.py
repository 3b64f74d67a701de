"""seq2seq.kernels.ops: the fused kernels' tanh gives tanh's values in place; freed memory
is reused."""

import os
import subprocess
import sys

import pytest
import torch

from seq2seq.kernels.ops import tanh_


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 3e-7), (torch.float64, 1e-15)])
def test_tanh_values_in_place(dtype, tol):
    x = torch.cat([torch.linspace(-30, 30, 10_001, dtype=dtype),
                   torch.tensor([0.0, 1e-30, -1e-8, float("inf"), float("-inf")], dtype=dtype)])
    want = torch.tanh(x)
    y = x.clone()
    assert tanh_(y) is y
    assert (y - want).abs().max() <= tol
    assert tanh_(torch.tensor([float("nan")], dtype=dtype)).isnan().all()


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
