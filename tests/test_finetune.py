"""Fine-tuning (``seq2seq train --init-from DIR``): a new run that starts from a trained model's
weights and tokenizers, with a fresh optimizer, schedule and step count."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
import torch
from conftest import LETTERS, MODEL_CONFIG, run_cli

from seq2seq.data.tokenizers import BOS_ID, EOS_ID
from seq2seq.decoding.translator import Translator


def read_metrics(model_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]


def teacher_forced_loss(model_dir: Path, sources: list[str], targets: list[str]) -> float:
    """Mean cross-entropy per target token (eos included) of the model in ``model_dir``, one
    sentence at a time: what a run's validation loss computes in batches."""
    translator = Translator.load(model_dir, device="cpu", kernels="reference")
    total, tokens = 0.0, 0
    with torch.inference_mode():
        for source, target in zip(sources, targets):
            src = torch.tensor([translator.src_tok.encode(source) + [EOS_ID]])
            tgt = translator.tgt_tok.encode(target)
            scores, _ = translator.model(src, torch.tensor([src.size(1)]), torch.tensor([[BOS_ID, *tgt]]))
            log_probs = torch.log_softmax(scores[0].float(), -1)
            total -= float(log_probs[torch.arange(len(tgt) + 1), torch.tensor([*tgt, EOS_ID])].sum())
            tokens += len(tgt) + 1
    return total / tokens


def test_the_first_validation_is_the_start_models_and_the_start_is_recorded(
        trained_model_dir, reversal_corpus, tmp_path):
    tuned = tmp_path / "tuned"
    done = run_cli("train", "--init-from", trained_model_dir, "--model-dir", tuned,
                   "--set", "train.epochs=1", "--set", "train.lr=0.002", "--set", "train.seed=5")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fine-tuning from" in done.stderr
    valid = [entry for entry in read_metrics(tuned) if "valid_loss" in entry]
    assert valid[0]["step"] == 0
    lines = [(reversal_corpus / f"valid.{side}").read_text().splitlines() for side in ("src", "tgt")]
    assert valid[0]["valid_loss"] == pytest.approx(teacher_forced_loss(trained_model_dir, *lines), abs=2e-4)
    # a fresh optimizer and schedule: the step count starts again, and the lr is the new one
    train_entries = [entry for entry in read_metrics(tuned) if "lr" in entry]
    assert train_entries[0]["step"] == 20 and train_entries[0]["lr"] == 0.002
    record = json.loads((tuned / "init.json").read_text())
    best = trained_model_dir / "best.safetensors"
    assert record == {"format": "seq2seq-init-1", "init_from": str(trained_model_dir.resolve()),
                      "checkpoint": "best.safetensors",
                      "sha256": hashlib.sha256(best.read_bytes()).hexdigest()}
    assert "init.json" in json.loads((tuned / "written.json").read_text())["files"]
    for name in ("tokenizer.json", *(p.name for p in trained_model_dir.glob("*.vocab.json"))):
        assert (tuned / name).read_bytes() == (trained_model_dir / name).read_bytes()
    # --overwrite by a run that is not a fine-tuning leaves no record of a start it did not have
    again = run_cli("train", "--config", reversal_corpus / "cfg.yaml", "--data-dir", reversal_corpus,
                    "--model-dir", tuned, "--overwrite", "--set", "train.max_steps=1")
    assert again.returncode == 0, again.stderr[-3000:]
    assert not (tuned / "init.json").exists()


def test_fine_tuning_learns_a_shifted_task(trained_model_dir, tmp_path):
    """Reversal -> copy: the same letters, now kept in order."""
    rng = random.Random(3)
    for split, n in (("train", 3000), ("valid", 100), ("test", 100)):
        lines = [" ".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 8))) for _ in range(n)]
        for side in ("src", "tgt"):
            (tmp_path / f"{split}.{side}").write_text("".join(line + "\n" for line in lines))
    (tmp_path / "copy.yaml").write_text(MODEL_CONFIG.replace("epochs: 5", "epochs: 3"))
    before = Translator.load(trained_model_dir, device="cpu").evaluate(tmp_path / "test.src",
                                                                         tmp_path / "test.tgt", beam=1)
    assert before["bleu"] < 50  # the reversal model reverses
    tuned = tmp_path / "tuned"
    done = run_cli("train", "--config", tmp_path / "copy.yaml", "--data-dir", tmp_path, "--model-dir", tuned,
                   "--init-from", trained_model_dir, "--init-checkpoint", "last")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tuned / "init.json").read_text())["checkpoint"] == "last.safetensors"
    after = Translator.load(tuned, device="cpu").evaluate(tmp_path / "test.src", tmp_path / "test.tgt",
                                                          beam=1)
    assert after["bleu"] > 90, (before, after)


@pytest.mark.parametrize(("flags", "named"), [
    (["--set", "model.hidden_size=48"], "model.hidden_size is 48 but that model has 64"),
    (["--set", "model.attention=dot"], "model.attention is 'dot'"),
    (["--set", "data.vocab_size=50"], "data.vocab_size is 50 but that model has 100"),
    (["--set", "data.tokenizer=char"], "data.tokenizer is 'char'"),
    (["--init-checkpoint", "averaged"], "no averaged.safetensors"),
    (["--resume"], "--resume continues a run"),
])
def test_a_different_architecture_or_vocabulary_is_refused(trained_model_dir, tmp_path, flags, named):
    target = tmp_path / "tuned"
    done = run_cli("train", "--init-from", trained_model_dir, "--model-dir", target, *flags)
    assert done.returncode == 1
    assert named in done.stderr, done.stderr
    assert not (target / "init.json").exists() and not (target / "config.yaml").exists()


def test_fine_tuning_into_its_own_start_is_refused_and_deletes_nothing(trained_model_dir):
    before = {p.name: p.read_bytes() for p in trained_model_dir.iterdir() if p.is_file()}
    done = run_cli("train", "--init-from", trained_model_dir, "--model-dir", trained_model_dir, "--overwrite")
    assert done.returncode == 1 and "is the --model-dir of this run" in done.stderr
    assert {p.name: p.read_bytes() for p in trained_model_dir.iterdir() if p.is_file()} == before


def test_init_from_a_folder_that_is_no_model(tmp_path):
    done = run_cli("train", "--init-from", tmp_path, "--model-dir", tmp_path / "out")
    assert done.returncode == 1 and f"{tmp_path} is not a model directory" in done.stderr
