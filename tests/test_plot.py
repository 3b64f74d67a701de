"""Pictures: PNGs that matplotlib reads back, clear errors, tolerant metrics reading."""

import json

import matplotlib
import matplotlib.image
import numpy as np
import pytest

from seq2seq.plot import plot_attention, plot_losses

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []  # no leftovers


def test_plot_attention_writes_png(tmp_path):
    backend = matplotlib.get_backend()
    src, tgt = list("3rd of March 2021"), list("2021-03-03")
    weights = np.random.default_rng(0).dirichlet(np.ones(len(src)), size=len(tgt))
    out = plot_attention(weights, src, tgt, tmp_path / "sub" / "att.png", title="dates")
    assert out == tmp_path / "sub" / "att.png"
    assert_png(out)
    assert matplotlib.get_backend() == backend  # no global state touched


def test_plot_attention_scales_with_labels(tmp_path):
    small = plot_attention(np.eye(3), list("abc"), list("xyz"), tmp_path / "small.png")
    words = [f"word{i}" for i in range(40)]
    large = plot_attention(np.ones((30, 40)) / 40, words, words[:30], tmp_path / "large.png")
    assert matplotlib.image.imread(large).shape[1] > matplotlib.image.imread(small).shape[1]


def test_plot_attention_shape_mismatch_names_both_shapes(tmp_path):
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(4, 3\)"):
        plot_attention(np.zeros((3, 4)), list("abc"), list("wxyz"), tmp_path / "bad.png")
    assert list(tmp_path.iterdir()) == []


def test_plot_losses_skips_torn_lines(tmp_path):
    train = [{"step": s, "train_loss": 3.0 / (s + 1)} for s in range(0, 100, 10)]
    valid = [{"step": 50, "valid_loss": 1.2, "valid_bleu": 12.5},
             {"step": 100, "valid_loss": 0.9, "valid_bleu": 20.0}]
    metrics = tmp_path / "metrics.jsonl"
    lines = [json.dumps(r) for r in train + valid[:1]] + ["[1, 2]", ""] + [json.dumps(valid[1])]
    metrics.write_text("\n".join(lines) + '\n{"step": 110, "train_lo', encoding="utf-8")
    out = plot_losses(metrics, tmp_path / "losses.png")
    assert_png(out)
    # What was drawn is exactly the picture of the whole records: nothing of the torn line,
    # nothing of the list, every record that was whole.
    expected = plot_losses(train + valid, tmp_path / "expected.png")
    assert np.array_equal(matplotlib.image.imread(out), matplotlib.image.imread(expected))
    # And the comparison can fail: a picture without the last validation is another picture.
    fewer = plot_losses(train + valid[:1], tmp_path / "fewer.png")
    assert not np.array_equal(matplotlib.image.imread(out), matplotlib.image.imread(fewer))


def test_plot_losses_from_records_without_bleu(tmp_path):
    records = [{"step": 1, "train_loss": 2.0}, {"step": 2, "train_loss": 1.5}, {"step": 2, "valid_loss": 1.7}]
    assert_png(plot_losses(records, str(tmp_path / "losses.png")))


def test_plot_losses_nothing_to_plot(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "lr": 0.001}\n{"step": 2, "train_loss": "nan?"}\n{"ste', encoding="utf-8")
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_losses(metrics, tmp_path / "losses.png")
    assert not (tmp_path / "losses.png").exists()
