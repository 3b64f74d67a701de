"""``--quantize`` (``Translator.load(quantize=True)``): int8 dynamic quantization for CPU decoding.

Quantization happens when a model is loaded and lives only in that process: the model
directory keeps its float32 weights, and a quantized model is never written back (the
checkpoint writer refuses it with an error that says so).
"""

from __future__ import annotations

import hashlib

import pytest
import torch
from conftest import reversal_pairs

from seq2seq import Translator
from seq2seq.models.checkpoint import CheckpointError, save_checkpoint


@pytest.fixture(scope="module")
def sentences() -> list[str]:
    import random

    return [src for src, _ in reversal_pairs(100, random.Random(11))]


def _digests(model_dir) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(model_dir.iterdir())
            if p.is_file()}


def test_quantized_linear_layers_are_int8(trained_model_dir):
    fp32 = Translator.load(trained_model_dir, device="cpu")
    int8 = Translator.load(trained_model_dir, device="cpu", quantize=True)
    linear = [m for m in fp32.model.modules() if type(m) is torch.nn.Linear]
    quantized = [m for m in int8.model.modules() if type(m).__name__ == "Linear"
                 and "quantized" in type(m).__module__]
    assert linear and len(quantized) == len(linear)
    assert not [m for m in int8.model.modules() if type(m) is torch.nn.Linear]


def test_quantized_outputs_are_close_to_float32(trained_model_dir, sentences):
    fp32 = Translator.load(trained_model_dir, device="cpu")
    int8 = Translator.load(trained_model_dir, device="cpu", quantize=True)
    for beam in (1, 3):
        expected = fp32.hypotheses(sentences, beam=beam)
        got = int8.hypotheses(sentences, beam=beam)
        same = [e[0].tokens == g[0].tokens for e, g in zip(expected, got, strict=True)]
        assert sum(same) >= 0.95 * len(sentences), (beam, sum(same))
        # where the translations agree, so do their log-probabilities, to int8's precision
        gaps = [abs(e[0].score - g[0].score) for e, g, s in zip(expected, got, same, strict=True) if s]
        assert max(gaps) < 0.05 * max(1.0, max(abs(e[0].score) for e in expected)), max(gaps)
    # and the model still does its task: reversal
    assert int8.translate(["a b c d"], beam=1) == ["d c b a"]


def test_quantizing_leaves_the_model_directory_and_later_loads_alone(trained_model_dir, sentences):
    before = _digests(trained_model_dir)
    reference = Translator.load(trained_model_dir, device="cpu").translate(sentences, beam=1)
    Translator.load(trained_model_dir, device="cpu", quantize=True).translate(sentences, beam=1)
    assert _digests(trained_model_dir) == before
    assert Translator.load(trained_model_dir, device="cpu").translate(sentences, beam=1) == reference


def test_a_quantized_model_is_not_saved(trained_model_dir, tmp_path):
    int8 = Translator.load(trained_model_dir, device="cpu", quantize=True)
    with pytest.raises(CheckpointError, match="quantized"):
        save_checkpoint(tmp_path / "int8.safetensors", int8.model, {})
    assert not (tmp_path / "int8.safetensors").exists()


def test_quantize_is_refused_clearly_where_torch_no_longer_has_it(trained_model_dir, monkeypatch):
    from seq2seq.config import ConfigError

    monkeypatch.delattr(torch.ao.quantization, "quantize_dynamic")
    with pytest.raises(ConfigError, match="no longer has torch.ao.quantization.quantize_dynamic"):
        Translator.load(trained_model_dir, device="cpu", quantize=True)
