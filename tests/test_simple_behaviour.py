"""``EncoderDecoderRNN`` (the NumPy API) on behaviour its docstring promises and no other test
trains for: an output longer than the input, ``mse`` with ``apply_softmax``, and training again
for a new output length. Toy tasks, learned in a few seconds each, through the public API only.
"""

from __future__ import annotations

import itertools

import numpy as np

from seq2seq.vectors.model import EncoderDecoderRNN

CLASSES = 4


def repeat_task(out_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every sequence of 3 symbols of 4 (one-hot, (64, 3, 4)), and its symbols repeated to
    ``out_len`` steps as classes, (64, out_len): ``a b c`` -> ``a b c a b c`` for 6."""
    symbols = np.array(list(itertools.product(range(CLASSES), repeat=3)))  # (64, 3)
    X = np.eye(CLASSES)[symbols]
    Y = symbols[:, np.arange(out_len) % 3]
    return X, Y, symbols


def exact_match(rnn: EncoderDecoderRNN, X: np.ndarray, Y: np.ndarray) -> float:
    predicted = rnn.predict_batch(X).argmax(-1)  # (n, T_out)
    assert predicted.shape == Y.shape
    return float((predicted == Y).all(axis=1).mean())


def new_rnn(**settings) -> EncoderDecoderRNN:
    return EncoderDecoderRNN(CLASSES, 32, CLASSES, loss="cross_entropy", cell="gru",
                             attention="bahdanau", seed=0, device="cpu", **settings)


def test_an_output_twice_as_long_as_the_input_is_learned():
    X, Y, _ = repeat_task(6)
    rnn = new_rnn()
    losses = rnn.train(X, Y, epochs=50, learning_rate=0.02, batch_size=16, verbose=False)
    assert losses[-1] < 0.1 * losses[0]
    assert exact_match(rnn, X, Y) >= 0.95
    steps = rnn.predict(X[0])
    assert len(steps) == 6 and steps[0].shape == (CLASSES, 1)
    assert rnn.predict_batch(X, length=9).shape == (64, 9, CLASSES)  # any length when asked


def test_training_again_for_a_new_output_length_replaces_the_old_one(tmp_path):
    X, Y3, _ = repeat_task(3)
    rnn = new_rnn()
    rnn.train(X, Y3, epochs=20, learning_rate=0.02, batch_size=16, verbose=False)
    assert rnn.predict_batch(X).shape == (64, 3, CLASSES)

    _, Y5, _ = repeat_task(5)
    rnn.train(X, Y5, epochs=50, learning_rate=0.02, batch_size=16, verbose=False)
    assert rnn.predict_batch(X).shape == (64, 5, CLASSES)  # the default length is the new one
    assert exact_match(rnn, X, Y5) >= 0.95

    rnn.save(tmp_path / "rnn")
    loaded = EncoderDecoderRNN.load(tmp_path / "rnn", device="cpu")
    np.testing.assert_allclose(loaded.predict_batch(X), rnn.predict_batch(X), atol=1e-6)


def test_mse_with_apply_softmax_trains_probabilities_to_soft_targets():
    """With ``loss='mse'`` and ``apply_softmax=True`` the softmax is part of the trained output:
    the predicted probabilities match targets (x, 1 - x) for each input value x. Scores trained
    to (x, 1 - x) without the softmax, then put through it, would not: softmax(0.9, 0.1) is
    (0.69, 0.31)."""
    rng = np.random.default_rng(0)
    X = rng.uniform(0.05, 0.95, size=(256, 3, 1))
    Y = np.concatenate([X, 1 - X], axis=-1)  # (256, 3, 2): a probability vector per step
    rnn = EncoderDecoderRNN(1, 32, 2, apply_softmax=True, loss="mse", cell="gru", attention="bahdanau",
                            seed=0, device="cpu")
    losses = rnn.train(X, Y, epochs=60, learning_rate=0.01, batch_size=32, verbose=False)
    assert losses[-1] < 0.05 * losses[0]
    predicted = rnn.predict_batch(X)
    assert np.all(predicted >= 0)
    np.testing.assert_allclose(predicted.sum(-1), 1.0, atol=1e-5)
    assert np.abs(predicted - Y).mean() < 0.05
