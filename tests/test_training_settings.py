"""Training and decoding settings do what they say, seen from outside (CLI, Translator, files):
``train.clip_grad``, ``decode.ban_unk``, ``train.valid_beam`` and ``train.max_minutes``.

Each trains a tiny model on the reversal task for a few updates (GRU 16/32, word tokenizer).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_reversal
from safetensors.torch import load_file

from seq2seq import cli
from seq2seq.data.tokenizers import UNK_ID
from seq2seq.decoding.translator import Translator

CONFIG = """\
data: {train_src: train.src, train_tgt: train.tgt, valid_src: valid.src, valid_tgt: valid.tgt,
       tokenizer: word, vocab_size: 100}
model: {embed_size: 16, hidden_size: 32, attention: bahdanau, dropout: 0.0}
train: {batch_tokens: 300, epochs: 50, lr: 0.005, log_every: 5, threads: 1, device: cpu, seed: 3,
        warmup_steps: 0}
decode: {beam: 1}
"""
ADAM_EPS = 1e-8  # torch.optim.Adam's default, which make_adam keeps


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    directory = write_reversal(tmp_path_factory.mktemp("settings"), {"train": 600, "valid": 60})
    (directory / "cfg.yaml").write_text(CONFIG, encoding="utf-8")
    return directory


def train(corpus: Path, model_dir: Path, capsys, *settings: str) -> str:
    """``seq2seq train`` in this process with ``--set`` SETTINGS; returns its stderr."""
    capsys.readouterr()
    args = ["train", "--config", str(corpus / "cfg.yaml"), "--data-dir", str(corpus),
            "--model-dir", str(model_dir)]
    for setting in settings:
        args += ["--set", setting]
    code = cli.main(args)
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    return err


def weights(model_dir: Path, name: str = "last.safetensors") -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(model_dir / name)).items() if k.startswith("model.")}


def largest_change(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_clip_grad_bounds_every_update(corpus, tmp_path, capsys):
    """Adam moves a weight by lr * m / (sqrt(v) + eps); with gradients clipped to a norm of
    ``c`` every |m| <= c, so no weight moves more than lr * c / eps in an update. With
    c = 1e-12 the five updates from step 1 to step 6 move no weight by more than 5 * lr * 1e-4;
    without clipping they move weights by about lr each."""
    lr, clip = 0.005, 1e-12
    moved = {}
    for name, setting in (("clipped", f"train.clip_grad={clip}"), ("free", "train.clip_grad=0")):
        one, six = tmp_path / f"{name}1", tmp_path / f"{name}6"
        train(corpus, one, capsys, setting, "train.max_steps=1")
        train(corpus, six, capsys, setting, "train.max_steps=6")
        moved[name] = largest_change(weights(one), weights(six))
    assert moved["clipped"] <= 5 * lr * clip / ADAM_EPS
    assert moved["free"] > 0.5 * lr  # without the bound, updates are far larger


@pytest.fixture(scope="module")
def unk_model(corpus, tmp_path_factory) -> Path:
    """A model whose target vocabulary knows only 4 of the 8 letters (vocab_size 8 = 4 specials
    + 4 words): it learns to write <unk> for the other 4, whose reversal it must copy."""
    model_dir = tmp_path_factory.mktemp("unk") / "model"
    done = cli.main(["train", "--config", str(corpus / "cfg.yaml"), "--data-dir", str(corpus),
                     "--model-dir", str(model_dir), "--set", "data.vocab_size=8",
                     "--set", "train.max_steps=60", "--set", "train.valid_every=60"])
    assert done == 0
    return model_dir


def test_ban_unk_never_emits_unk(unk_model, corpus):
    sources = (corpus / "valid.src").read_text().splitlines()
    translator = Translator.load(unk_model, device="cpu")
    assert len(translator.tgt_tok) == 8
    for beam in (1, 3):
        translator.config.decode.ban_unk = False
        allowed = [h.tokens for (h,) in translator.hypotheses(sources, beam=beam)]
        assert sum(UNK_ID in tokens for tokens in allowed) > len(sources) // 4, "the model never writes <unk>"
        translator.config.decode.ban_unk = True
        banned = [h.tokens for (h,) in translator.hypotheses(sources, beam=beam)]
        assert not any(UNK_ID in tokens for tokens in banned)
        if beam == 1:  # greedy search: where <unk> never won a step, banning it changes nothing
            assert [b for a, b in zip(allowed, banned) if UNK_ID not in a] == [
                a for a in allowed if UNK_ID not in a]


def validation_bleu(model_dir: Path) -> list[float]:
    lines = (model_dir / "metrics.jsonl").read_text().splitlines()
    return [entry["valid_bleu"] for entry in map(json.loads, lines) if "valid_bleu" in entry]


def test_valid_beam_is_the_beam_validation_decodes_with(corpus, tmp_path, capsys):
    """After 40 updates, greedy and beam-4 translations of the validation set score differently;
    the BLEU that validation logs is the one of ``train.valid_beam``'s search."""
    sources, refs = corpus / "valid.src", corpus / "valid.tgt"
    for valid_beam in (1, 4):
        model_dir = tmp_path / f"beam{valid_beam}"
        train(corpus, model_dir, capsys, f"train.valid_beam={valid_beam}", "train.max_steps=40",
              "train.valid_every=40")
        (logged,) = validation_bleu(model_dir)
        translator = Translator.load(model_dir, device="cpu")  # best = the model validated at 40
        greedy = translator.evaluate(sources, refs, beam=1)["bleu"]
        beam = translator.evaluate(sources, refs, beam=4)["bleu"]
        assert abs(greedy - beam) > 0.1, "greedy and beam search agree here: choose another step count"
        assert logged == pytest.approx(greedy if valid_beam == 1 else beam, abs=1e-6)


def test_max_minutes_stops_training_by_the_time_budget(corpus, tmp_path, capsys):
    """A budget of 6 ms ends a run of 50 epochs long before its end: after the update that
    crosses the budget, with the last checkpoint written and the reason given."""
    model_dir = tmp_path / "model"
    err = train(corpus, model_dir, capsys, "train.max_minutes=0.0001")
    assert "training finished: time budget of 0.0001 minute(s) used" in err
    state = json.loads(load_file_metadata(model_dir / "last.safetensors"))["train_state"]
    assert state["stop_reason"].startswith("time budget") and state["finished"]
    assert 1 <= state["step"] and state["epoch"] < 50
    assert state["elapsed_s"] >= 0.006


def load_file_metadata(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()["meta"]
