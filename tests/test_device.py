"""The device and precision a run takes: ``train.precision: auto`` reads the CPU's flags."""

from __future__ import annotations

import pytest
import torch

from seq2seq import device as device_module
from seq2seq.device import cpu_has_native_bf16, describe_precision, resolve_precision

FLAGS = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f {extra}\nbugs\t\t: spectre_v1\n"


@pytest.mark.parametrize("extra, native", [("", False), ("avx512_bf16", True), ("amx_tile amx_bf16", True),
                                           ("avx512_vnni", False)])
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, extra, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(FLAGS.format(extra=extra))
    assert cpu_has_native_bf16.__wrapped__(cpuinfo) is native


def test_no_cpu_flags_to_read_means_no_native_bf16(tmp_path):
    assert cpu_has_native_bf16.__wrapped__(tmp_path / "absent") is False


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_only_on_a_cpu_with_native_bf16(monkeypatch, native):
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: native)
    assert resolve_precision("auto", torch.device("cpu")) == ("bf16" if native else "fp32")
    assert resolve_precision("auto", torch.device("cuda")) == "fp32"  # a GPU asks for bf16 itself
    for given in ("fp32", "bf16"):
        assert resolve_precision(given, torch.device("cpu")) == given
    words = describe_precision("auto", "bf16" if native else "fp32")
    assert ("native BF16" in words) and ("no native" in words) is not native
    assert describe_precision("bf16", "bf16") == "bf16"
