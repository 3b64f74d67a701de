"""Importing seq2seq only defines things: no torch kernel runs, no random stream moves, no
process setting changes (threads, default dtype, glibc's malloc); loading a model and
translating change no process setting either, and draw nothing from a random stream.
Process-wide tuning is the ``seq2seq`` command's (``cli.main``) or the application's
(``ops.keep_freed_memory``)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

_SCRIPT = r"""
import ctypes, json, random, resource, sys
import numpy as np
import torch

def states():
    return {"python": repr(random.getstate()), "numpy": repr(np.random.get_state()),
            "torch": torch.get_rng_state().tolist(), "threads": torch.get_num_threads(),
            "interop": torch.get_num_interop_threads(), "dtype": str(torch.get_default_dtype())}

def faults_of_freed_blocks():
    # a 64 MiB block made, written and freed three times, as a step's scores: glibc's default
    # maps it afresh each time (about 16,384 page faults each)
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    faults = []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(64 << 20)
        libc.memset(block, 1, 64 << 20)
        libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return faults

before = states()
with torch.autograd.profiler.profile() as prof:
    import seq2seq, seq2seq.cli, seq2seq.kernels.policy, seq2seq.kernels.ops  # noqa: F401
    import seq2seq.decoding.search  # noqa: F401
ops_run = sorted({event.name for event in prof.function_events})
after_import = states()
from seq2seq.decoding.translator import Translator
translator = Translator.load(sys.argv[1], device="cpu")
translator.translate(["a b c"])
after_load = states()  # the random streams included: loading draws nothing
print(json.dumps({"ops": ops_run, "import_same": before == after_import,
                  "load_same": before == after_load, "faults": faults_of_freed_blocks()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_import_and_load_change_nothing(trained_model_dir):
    done = subprocess.run([sys.executable, "-c", _SCRIPT, str(trained_model_dir)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["ops"] == []  # no kernel ran, oneDNN's probe included
    assert result["import_same"] and result["load_same"]
    assert min(result["faults"]) > 16_000  # malloc as glibc left it: nothing kept
