"""Training: a run stopped by its step budget and resumed with a bigger one ends exactly where
an uninterrupted run ends, tensor for tensor, dropout and gradient accumulation included.

The runs go through ``cli.main`` in-process (argument parsing, ``--set``, ``--resume``), on a
tiny reversal corpus without validation data, so each takes a second or two.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import write_reversal

from seq2seq import cli
from seq2seq.models.checkpoint import read_checkpoint

CONFIG = """\
data: {train_src: train.src, train_tgt: train.tgt, tokenizer: word, vocab_size: 100}
model: {embed_size: 16, hidden_size: 24, attention: bahdanau, dropout: 0.3}
train: {batch_tokens: 100, accumulate: 2, epochs: 5, lr: 0.01, warmup_steps: 3, log_every: 2,
        threads: 1, device: cpu, seed: 4}
"""
STEPS = 7  # the first session's budget; the whole run has 2 * STEPS, across an epoch boundary


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    directory = write_reversal(tmp_path_factory.mktemp("resume"), {"train": 300}, seed=3)
    (directory / "cfg.yaml").write_text(CONFIG, encoding="utf-8")
    return directory


def train(corpus: Path, model_dir: Path, *extra: str) -> None:
    args = ["train", "--model-dir", str(model_dir), *extra]
    if "--resume" not in extra:
        args += ["--config", str(corpus / "cfg.yaml"), "--data-dir", str(corpus)]
    assert cli.main(args) == 0


def checkpoint(model_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = read_checkpoint(model_dir / "last.safetensors")
    state = dict(meta["train_state"])
    state.pop("elapsed_s")
    return tensors, state


def test_resume_with_a_bigger_step_budget_equals_one_run(corpus, tmp_path, capsys):
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(corpus, whole, "--set", f"train.max_steps={2 * STEPS}")
    train(corpus, split, "--set", f"train.max_steps={STEPS}")
    halfway, half_state = checkpoint(split)
    assert half_state["step"] == STEPS and half_state["finished"] and half_state["epoch"] == 0
    capsys.readouterr()

    train(corpus, split, "--resume", "--set", f"train.max_steps={2 * STEPS}")
    assert "the new budget allows more: continuing" in capsys.readouterr().err

    expected, expected_state = checkpoint(whole)
    got, got_state = checkpoint(split)
    assert got_state == expected_state
    assert got_state["step"] == 2 * STEPS and got_state["epoch"] >= 1  # an epoch boundary crossed
    assert sorted(got) == sorted(expected)
    assert any(k.startswith("optim.") for k in got) and any(k.startswith("rng.") for k in got)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    assert not torch.equal(halfway["model.encoder.rnn.weight_hh_l0"],
                           got["model.encoder.rnn.weight_hh_l0"])  # the second session trained


def test_dropout_matters_so_the_resume_test_can_fail(corpus, tmp_path):
    """Runs that differ only in dropout (same seed: same initial weights, same batches) end
    elsewhere: the masks change the weights, so a resume that drew other masks than the
    uninterrupted run would fail the equality above."""
    from seq2seq.config import Config
    from seq2seq.models.builder import build_model

    config = Config.load(str(corpus / "cfg.yaml"))
    initial = []
    for dropout in (0.3, 0.0):
        config.model.dropout = dropout
        torch.manual_seed(4)
        initial.append(build_model(config.model, 20, 20, 0).state_dict())
    assert all(torch.equal(initial[0][k], initial[1][k]) for k in initial[0])  # dropout draws nothing

    for name, dropout in (("a", "0.3"), ("b", "0.0"), ("c", "0.3")):
        train(corpus, tmp_path / name, "--set", "train.max_steps=3", "--set", f"model.dropout={dropout}")
    a, _ = checkpoint(tmp_path / "a")
    b, _ = checkpoint(tmp_path / "b")
    c, _ = checkpoint(tmp_path / "c")
    assert all(torch.equal(a[k], c[k]) for k in a if k.startswith("model."))  # repeatable
    assert not torch.equal(a["model.generator.bias"], b["model.generator.bias"])  # dropout acted


def test_resume_without_more_budget_does_nothing(corpus, tmp_path, capsys):
    model_dir = tmp_path / "run"
    train(corpus, model_dir, "--set", "train.max_steps=2")
    before = (model_dir / "last.safetensors").read_bytes()
    capsys.readouterr()
    train(corpus, model_dir, "--resume")
    assert "this run already finished (2 steps done); nothing to do" in capsys.readouterr().err
    assert (model_dir / "last.safetensors").read_bytes() == before


def test_a_finished_run_goes_on_with_more_epochs(corpus, tmp_path, capsys):
    model_dir = tmp_path / "run"
    train(corpus, model_dir, "--set", "train.epochs=1")
    _, first = checkpoint(model_dir)
    assert first["finished"] and first["stop_reason"] == "1 epochs done" and first["epoch"] == 1
    train(corpus, model_dir, "--resume", "--set", "train.epochs=2")
    _, second = checkpoint(model_dir)
    assert second["finished"] and second["epoch"] == 2 and second["step"] == 2 * first["step"]
    assert "training finished: 2 epochs done" in capsys.readouterr().err


def test_bf16_on_cpu_runs_the_output_layer_in_bf16_without_autocast(corpus, tmp_path,
                                                                     monkeypatch):
    """CPU bf16 training: the fused loss's products in bf16, the rest float32 with no
    autocast, so the step-wise decoder's fused path runs (it refuses autocast)."""
    from seq2seq.kernels import loss as loss_module
    from seq2seq.kernels import stepwise

    seen, fused_steps = [], []
    real_loss, real_stepwise = loss_module.output_cross_entropy, stepwise.run_stepwise

    def spy_loss(*args, **kwargs):
        autocast = (torch.ones(1, 1) @ torch.ones(1, 1)).dtype != torch.float32  # any torch version
        seen.append((args[-1] if len(args) > 6 else kwargs.get("matmul_dtype"), autocast, args[0].dtype))
        return real_loss(*args, **kwargs)

    def spy_stepwise(*args, **kwargs):
        fused_steps.append(1)
        return real_stepwise(*args, **kwargs)

    monkeypatch.setattr(loss_module, "output_cross_entropy", spy_loss)
    monkeypatch.setattr(stepwise, "run_stepwise", spy_stepwise)
    train(corpus, tmp_path / "run", "--set", "train.max_steps=3", "--set",
          "train.precision=bf16")
    assert seen and all(s == (torch.bfloat16, False, torch.float32) for s in seen)
    assert len(fused_steps) >= 3 * 2  # every micro-batch (accumulate 2) took the fused path
    tensors, state = checkpoint(tmp_path / "run")
    assert state["step"] == 3
    assert all(bool(torch.isfinite(t).all()) for k, t in tensors.items() if k.startswith("model."))


def test_precision_auto_is_decided_at_the_start_and_kept_on_resume(corpus, tmp_path, monkeypatch, capsys):
    """auto becomes the precision this CPU computes natively; the run's config.yaml records it,
    and a resume on a CPU without native BF16 goes on in the run's own precision."""
    from seq2seq import device as device_module
    from seq2seq.config import Config

    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: True)
    train(corpus, tmp_path / "run", "--set", "train.max_steps=2")  # CONFIG leaves precision: auto
    assert Config.load(tmp_path / "run" / "config.yaml").train.precision == "bf16"
    assert "precision bf16 (auto: this CPU has native BF16)" in capsys.readouterr().err
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: False)
    train(corpus, tmp_path / "run", "--resume", "--set", "train.max_steps=3")  # the saved config: bf16
    assert "precision bf16;" in capsys.readouterr().err
    train(corpus, tmp_path / "run", "--resume", "--config", str(corpus / "cfg.yaml"), "--data-dir",
          str(corpus), "--set", "train.max_steps=4")  # the config again: auto
    assert "precision bf16 (auto: the run's own, kept on resume)" in capsys.readouterr().err
    assert checkpoint(tmp_path / "run")[1]["step"] == 4
    train(corpus, tmp_path / "fresh", "--set", "train.max_steps=1")  # a new run here: fp32
    assert Config.load(tmp_path / "fresh" / "config.yaml").train.precision == "fp32"
    assert "precision fp32 (auto: no native BF16 on this device)" in capsys.readouterr().err
