"""Checkpoint averaging: one checkpoint gives its weights bit for bit, two their mean; the
checkpoints of different models are refused with the file named; the last N are kept."""

from __future__ import annotations

import pytest
import torch
from conftest import run_cli
from torch import nn

from seq2seq.models.checkpoint import MODEL_PREFIX, CheckpointError, read_checkpoint
from seq2seq.training.average import (
    average_checkpoints,
    average_last,
    keep_checkpoint,
    kept_checkpoints,
    kept_name,
)


def _model(seed: int, hidden: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(7, hidden), nn.GRU(hidden, hidden), nn.Linear(hidden, 7))


def _weights(path) -> dict[str, torch.Tensor]:
    tensors, _ = read_checkpoint(path)
    return {k[len(MODEL_PREFIX):]: v for k, v in tensors.items()}


def test_one_checkpoint_averages_to_itself_bit_for_bit(tmp_path):
    model = _model(0)
    keep_checkpoint(tmp_path, model, step=10, keep=3, meta={"model": {"hidden": 5}})
    averaged, meta = average_checkpoints([tmp_path / kept_name(10)])
    for name, tensor in model.state_dict().items():
        assert torch.equal(averaged[MODEL_PREFIX + name], tensor)
    assert meta == {"averaged": [kept_name(10)], "model": {"hidden": 5}}


def test_two_checkpoints_average_to_their_mean(tmp_path):
    first, second = _model(1), _model(2)
    keep_checkpoint(tmp_path, first, step=1, keep=2, meta={})
    keep_checkpoint(tmp_path, second, step=2, keep=2, meta={})
    output = average_last(tmp_path, last=2)
    averaged = _weights(output)
    for name, tensor in first.state_dict().items():
        mean = ((tensor.double() + second.state_dict()[name].double()) / 2).float()
        assert torch.equal(averaged[name], mean), name
    assert not torch.equal(averaged["2.weight"], first.state_dict()["2.weight"])


def test_only_the_last_n_are_kept_and_averaged(tmp_path):
    for step in (100, 200, 300, 400):
        keep_checkpoint(tmp_path, _model(step), step=step, keep=2, meta={})
    assert [step for step, _ in kept_checkpoints(tmp_path)] == [300, 400]
    averaged = _weights(average_last(tmp_path, last=1))
    assert torch.equal(averaged["0.weight"], _model(400).state_dict()["0.weight"])
    with pytest.raises(CheckpointError, match="fewer than --last 3"):
        average_last(tmp_path, last=3)


def test_checkpoints_of_different_models_are_refused_naming_the_file(tmp_path):
    keep_checkpoint(tmp_path, _model(0, hidden=5), step=1, keep=5, meta={})
    keep_checkpoint(tmp_path, _model(0, hidden=6), step=2, keep=5, meta={})
    with pytest.raises(CheckpointError, match=f"{kept_name(2)}: weight '0.weight' is \\(7, 6\\)"):
        average_last(tmp_path, last=2)


def test_checkpoints_with_different_model_settings_are_refused(tmp_path):
    keep_checkpoint(tmp_path, _model(0), step=1, keep=5, meta={"model": {"cell": "gru"}})
    keep_checkpoint(tmp_path, _model(1), step=2, keep=5, meta={"model": {"cell": "lstm"}})
    with pytest.raises(CheckpointError, match=f"{kept_name(2)}: its model settings differ"):
        average_last(tmp_path, last=2)


def test_a_run_keeps_its_last_checkpoints_and_translates_with_their_average(reversal_corpus, tmp_path):
    """seq2seq train with train.keep_checkpoints, then seq2seq average and translate
    --checkpoint averaged, as a user would; --overwrite deletes the kept files with the run's."""
    model_dir = tmp_path / "run"
    args = ("--config", reversal_corpus / "cfg.yaml", "--data-dir", reversal_corpus,
            "--model-dir", model_dir, "--set", "train.keep_checkpoints=2", "--set", "train.epochs=3")
    done = run_cli("train", *args)
    assert done.returncode == 0, done.stderr[-2000:]
    kept = kept_checkpoints(model_dir)
    assert len(kept) == 2 and kept[0][0] < kept[1][0]
    done = run_cli("average", "--model-dir", model_dir, "--last", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    averaged = _weights(model_dir / "averaged.safetensors")
    first, second = _weights(kept[0][1]), _weights(kept[1][1])
    for name, tensor in averaged.items():
        assert torch.equal(tensor, ((first[name].double() + second[name].double()) / 2).float())
    done = run_cli("translate", "--model-dir", model_dir, "--checkpoint", "averaged",
                   "--input", reversal_corpus / "test.src", "--output", tmp_path / "out.txt")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = (reversal_corpus / "test.src").read_text().splitlines()
    assert len((tmp_path / "out.txt").read_text().splitlines()) == len(lines)
    done = run_cli("average", "--model-dir", model_dir, "--last", "3")
    assert done.returncode != 0 and "fewer than --last 3" in done.stderr
    done = run_cli("train", *args, "--overwrite", "--set", "train.keep_checkpoints=0")
    assert done.returncode == 0, done.stderr[-2000:]
    assert kept_checkpoints(model_dir) == [] and not (model_dir / "averaged.safetensors").exists()
