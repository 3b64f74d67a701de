"""Checkpoints: atomic files, exact save/load of model, optimizer and random state, clear errors."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from seq2seq.config import ModelConfig
from seq2seq.files import atomic_write_bytes
from seq2seq.models import checkpoint as ckpt
from seq2seq.models.checkpoint import (
    CheckpointError,
    load_model,
    load_training_state,
    read_checkpoint,
    save_checkpoint,
)
from seq2seq.models.rnn.model import Seq2Seq

VOCAB = 11


def tiny_model(seed: int = 0, hidden: int = 8, tie: bool = True) -> Seq2Seq:
    torch.manual_seed(seed)
    config = ModelConfig(embed_size=6, hidden_size=hidden, dropout=0.0, tie_embeddings=tie)
    return Seq2Seq(config, src_vocab=VOCAB, tgt_vocab=VOCAB)


def trained_pair(seed: int = 0) -> tuple[Seq2Seq, torch.optim.Optimizer]:
    """A model and its Adam optimizer after two updates, so the optimizer has state."""
    model = tiny_model(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    src = torch.randint(4, VOCAB, (3, 5))
    tgt = torch.randint(4, VOCAB, (3, 4))
    for _ in range(2):
        scores, _ = model(src, torch.tensor([5, 4, 2]), tgt)
        loss = torch.nn.functional.cross_entropy(scores.reshape(-1, VOCAB), tgt.reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# -- atomic writes ------------------------------------------------------------------------------
@pytest.mark.parametrize("failing, error", [("replace", OSError), ("fsync", KeyboardInterrupt)])
def test_failed_atomic_write_leaves_old_file_and_no_tmp(tmp_path, monkeypatch, failing, error):
    path = tmp_path / "file.bin"
    path.write_bytes(b"old")

    def fail(*args, **kwargs):
        raise error(28, "No space left on device") if error is OSError else error()

    monkeypatch.setattr(ckpt.os, failing, fail)
    with pytest.raises(error):
        atomic_write_bytes(path, b"new" * 1000)
    monkeypatch.undo()
    assert path.read_bytes() == b"old"
    assert leftovers(tmp_path) == []


def test_failed_checkpoint_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, optimizer = trained_pair()
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, model, {"step": 1}, optimizer=optimizer)
    before = path.read_bytes()
    monkeypatch.setattr(ckpt.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(5, "I/O error")))
    with pytest.raises(OSError):
        save_checkpoint(path, model, {"step": 2}, optimizer=optimizer)
    monkeypatch.undo()
    assert path.read_bytes() == before and leftovers(tmp_path) == []
    assert read_checkpoint(path)[1]["step"] == 1


def test_atomic_write_replaces_and_keeps_permissions_readable(tmp_path):
    path = tmp_path / "file.txt"
    atomic_write_bytes(path, b"one")
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two" and leftovers(tmp_path) == []
    assert os.stat(path).st_mode & 0o044  # not mkstemp's private 0600


# -- save and load ------------------------------------------------------------------------------
def test_roundtrip_restores_model_optimizer_and_random_state(tmp_path):
    model, optimizer = trained_pair(seed=0)
    meta = {"train_state": {"step": 2, "epoch": 0}, "note": "ü"}
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    save_checkpoint(tmp_path / "last.safetensors", model, meta, optimizer=optimizer)
    expected_draws = (torch.rand(4), random.random(), np.random.rand(3))

    other, other_optimizer = trained_pair(seed=1)  # different weights and optimizer moments
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    loaded = load_training_state(tmp_path / "last.safetensors", other, other_optimizer)
    assert {k: loaded[k] for k in meta} == meta
    for name, tensor in model.state_dict().items():
        assert torch.equal(other.state_dict()[name], tensor), name
    mine, theirs = optimizer.state_dict(), other_optimizer.state_dict()
    assert mine["param_groups"] == theirs["param_groups"]
    assert mine["state"].keys() == theirs["state"].keys()
    for index, values in mine["state"].items():
        for key, value in values.items():
            assert torch.equal(torch.as_tensor(theirs["state"][index][key]), torch.as_tensor(value))
    draws = (torch.rand(4), random.random(), np.random.rand(3))
    assert torch.equal(draws[0], expected_draws[0]) and draws[1] == expected_draws[1]
    assert np.array_equal(draws[2], expected_draws[2])


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path):
    model = tiny_model(tie=True)
    assert model.generator.weight is model.tgt_embed.weight
    save_checkpoint(tmp_path / "best.safetensors", model, {})
    tensors, _ = read_checkpoint(tmp_path / "best.safetensors")
    assert "model.tgt_embed.weight" in tensors and "model.generator.weight" not in tensors
    other = tiny_model(seed=1, tie=True)
    load_model(tmp_path / "best.safetensors", other)
    assert other.generator.weight is other.tgt_embed.weight
    assert torch.equal(other.generator.weight, model.tgt_embed.weight)

    untied = tiny_model(tie=False)
    save_checkpoint(tmp_path / "untied.safetensors", untied, {})
    assert "model.generator.weight" in read_checkpoint(tmp_path / "untied.safetensors")[0]


def test_loading_into_another_shape_names_the_tensor(tmp_path):
    save_checkpoint(tmp_path / "small.safetensors", tiny_model(hidden=8), {})
    with pytest.raises(CheckpointError, match=r"weight '[\w.]+' has shape \(\d+(, \d+)*\), the model "
                                              r"expects \(\d+(, \d+)*\)"):
        load_model(tmp_path / "small.safetensors", tiny_model(hidden=16))


def test_loading_into_another_architecture_names_the_tensor(tmp_path):
    save_checkpoint(tmp_path / "tied.safetensors", tiny_model(tie=True), {})
    with pytest.raises(CheckpointError, match=r"weight 'generator\.weight' is missing"):
        load_model(tmp_path / "tied.safetensors", tiny_model(tie=False))


def test_unreadable_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_model(tmp_path / "none.safetensors", tiny_model())
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="not a readable safetensors checkpoint"):
        load_model(junk, tiny_model())
    save_checkpoint(tmp_path / "weights.safetensors", tiny_model(), {"step": 3})
    model = tiny_model()
    with pytest.raises(CheckpointError, match="holds no training state"):
        load_training_state(tmp_path / "weights.safetensors", model, torch.optim.Adam(model.parameters()))


# -- training metadata read back ------------------------------------------------------------------
STATE_FIELDS = {"step": int, "epoch": int, "elapsed_s": float, "finished": bool, "stop_reason": str}


def _tampered(path, change) -> None:
    """Rewrite the checkpoint ``path`` with ``change`` applied to its metadata (tensors kept)."""
    import json

    from safetensors.torch import save as safetensors_bytes

    tensors, meta = read_checkpoint(path)
    change(meta, tensors)
    header = {"format": ckpt.FORMAT, "meta": json.dumps(meta)}
    path.write_bytes(safetensors_bytes(tensors, metadata=header))


@pytest.mark.parametrize("change, message", [
    (lambda m, t: m.pop("train_state"), r"'train_state' must be an object, missing"),
    (lambda m, t: m.update(train_state=[1]), r"'train_state' must be an object, got \[1\]"),
    (lambda m, t: m["train_state"].update(step="12"), r"'train_state.step' must be of type int, got '12'"),
    (lambda m, t: m["train_state"].update(step=1.0), r"'train_state.step' must be of type int, got 1.0"),
    (lambda m, t: m["train_state"].update(finished="no"), r"'train_state.finished' must be of type bool"),
    (lambda m, t: m["train_state"].update(elapsed_s=None), r"'train_state.elapsed_s' must be of type float"),
    (lambda m, t: m.pop("rng"), r"'rng' must be an object, missing"),
    (lambda m, t: m["rng"].pop("python"), r"'rng.python' must be Python's random state .*, missing"),
    (lambda m, t: m["rng"].update(python=[3, [1, 2], None]), r"'rng.python' must be Python's random state"),
    (lambda m, t: m["rng"].update(python="x"), r"'rng.python' must be Python's random state .* got 'x'"),
    (lambda m, t: m["rng"].pop("numpy"), r"'rng.numpy' must be NumPy's MT19937 state, missing"),
    (lambda m, t: m["rng"]["numpy"]["state"].update(key=[1, 2]), r"'rng.numpy' must be NumPy's MT19937"),
    (lambda m, t: t.pop("rng.torch"), r"tensor rng.torch must be torch's random state, got nothing"),
    (lambda m, t: t.update({"rng.torch": torch.zeros(3, dtype=torch.uint8)}),
     r"rng.torch .* got shape \(3,\)"),
    (lambda m, t: m.pop("optimizer"), r"'optimizer' must be an object, missing"),
    (lambda m, t: m["optimizer"].update(param_groups={"lr": 1}), r"'optimizer.param_groups' must be a list"),
])
def test_training_metadata_that_a_run_did_not_write_is_refused_before_anything_is_restored(
        tmp_path, change, message):
    model, optimizer = trained_pair(seed=0)
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, model, {"train_state": {"step": 2, "epoch": 0, "finished": False}},
                    optimizer=optimizer)
    _tampered(path, change)
    other, other_optimizer = trained_pair(seed=1)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    random.seed(5)
    python_state, torch_state = random.getstate(), torch.get_rng_state()
    with pytest.raises(CheckpointError, match=rf"^{path}: .*{message}"):
        load_training_state(path, other, other_optimizer, state_fields=STATE_FIELDS)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    assert random.getstate() == python_state and torch.equal(torch.get_rng_state(), torch_state)


def test_a_resume_from_a_checkpoint_without_train_state_is_one_line_of_error(tmp_path, capsys):
    """Through the command: ``seq2seq train --resume`` names the file and the field."""
    from conftest import write_reversal

    from seq2seq import cli

    data = write_reversal(tmp_path / "data", {"train": 60, "valid": 8})
    config = tmp_path / "cfg.yaml"
    config.write_text("data: {train_src: train.src, train_tgt: train.tgt, valid_src: valid.src, "
                      "valid_tgt: valid.tgt, tokenizer: char}\nmodel: {embed_size: 8, hidden_size: 8}\n"
                      "train: {epochs: 1, batch_tokens: 200, device: cpu, max_steps: 2}\n")
    model_dir = tmp_path / "model"
    args = ["train", "--config", str(config), "--data-dir", str(data), "--model-dir", str(model_dir)]
    assert cli.main(args) == 0
    _tampered(model_dir / "last.safetensors", lambda m, t: m.pop("train_state"))
    capsys.readouterr()
    assert cli.main([*args, "--resume"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"seq2seq: error: {model_dir / 'last.safetensors'}: metadata field 'train_state' must be" in err
