"""EncoderDecoderRNN: toy tasks it must learn, invariants, saving, and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from seq2seq.vectors import model as simple
from seq2seq.vectors.model import EncoderDecoderRNN

VOCAB, LENGTH = 10, 10


def reversal_data(n: int, seed: int, length: int = LENGTH) -> tuple[np.ndarray, np.ndarray]:
    """One-hot inputs (n, length, VOCAB) and the reversed token ids (n, length)."""
    tokens = np.random.default_rng(seed).integers(0, VOCAB, (n, length))
    return np.eye(VOCAB)[tokens], tokens[:, ::-1].copy()


@pytest.fixture(scope="module")
def reverser() -> EncoderDecoderRNN:
    """An attention model trained to reverse random sequences (about 2 s on one core)."""
    X, Y = reversal_data(800, seed=0)
    rnn = EncoderDecoderRNN(VOCAB, 32, VOCAB, loss="cross_entropy", attention="luong", seed=0)
    rnn.train(X, Y, epochs=15, learning_rate=0.01, batch_size=32, verbose=False)
    return rnn


def untrained(**kwargs) -> EncoderDecoderRNN:
    args = dict(input_size=3, hidden_size=16, output_size=4, seed=0, device="cpu")
    args.update(kwargs)
    return EncoderDecoderRNN(**args)


def ragged_inputs(size: int = 3, lengths=(5, 2, 7, 1, 4), seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(n, size)) for n in lengths]


# -- learning -------------------------------------------------------------------------------
def test_attention_model_reverses_unseen_sequences(reverser):
    X, Y = reversal_data(300, seed=1)  # not the training sequences
    outputs, weights = reverser.predict_batch(X, return_attention=True)
    assert outputs.shape == (300, LENGTH, VOCAB)
    accuracy = (outputs.argmax(-1) == Y).mean()
    assert accuracy >= 0.95

    # Near anti-diagonal: step t reads source position LENGTH-1-t or a neighbour (a
    # unidirectional encoder's state one step later still holds that token).
    target = LENGTH - 1 - np.arange(LENGTH)
    near = np.abs(weights.argmax(-1) - target) <= 1  # (300, LENGTH)
    assert near.mean() >= 0.9
    positions = np.arange(LENGTH)
    band = np.abs(positions[None, :] - target[:, None]) <= 1  # (LENGTH, LENGTH)
    assert (weights * band).sum(-1).mean() >= 0.8


def test_mse_model_learns_values_with_a_different_output_length():
    # Output the first two input values: T_in 5, T_out 2, identity feedback.
    rng = np.random.default_rng(0)
    X = rng.uniform(-1, 1, (200, 5))  # (n, T) since input_size is 1
    Y = X[:, :2, None]  # (n, 2, 1)
    rnn = EncoderDecoderRNN(1, 32, 1, seed=0, attention="bahdanau")
    history = rnn.train(X, Y, epochs=30, learning_rate=0.01, batch_size=20, verbose=False)
    assert len(history) == 30 and all(isinstance(v, float) for v in history)
    assert history[-1] < 0.1 * history[0]
    prediction = rnn.predict(X[0])
    assert len(prediction) == 2 and prediction[0].shape == (1, 1)


# -- prediction contract ----------------------------------------------------------------------
def test_predict_returns_column_vectors_and_seed_style_loss():
    rnn = untrained(input_size=1, output_size=5, apply_softmax=True, loss="cross_entropy")
    X = np.random.default_rng(0).uniform(size=(4, 6))
    Y = np.eye(5)[np.random.default_rng(1).integers(0, 5, (4, 3))][..., None]  # (4, 3, 5, 1)
    rnn.train(X, Y, epochs=1, learning_rate=1e-3, verbose=False)
    y_pred = rnn.predict(list(X[0]))  # a list of floats, as the seed gives it
    assert len(y_pred) == 3 and all(y.shape == (5, 1) for y in y_pred)
    assert np.allclose([y.sum() for y in y_pred], 1.0, atol=1e-5)  # probabilities
    assert len(rnn.predict(X[0], length=7)) == 7
    expected = -sum(float(np.sum(t * np.log(p))) for p, t in zip(y_pred, list(Y[0])))
    assert rnn.loss_function(y_pred, list(Y[0])) == pytest.approx(expected, rel=1e-5)
    assert rnn.loss_function(np.array(y_pred), Y[0]) == pytest.approx(expected, rel=1e-5)
    classes = Y[0, :, :, 0].argmax(-1)
    assert rnn.loss_function(y_pred, classes) == pytest.approx(expected, rel=1e-5)


def test_loss_function_mse_is_summed_squared_error():
    rnn = untrained(output_size=2)
    pred = [np.array([[1.0], [2.0]]), np.array([[0.0], [0.5]])]
    true = np.array([[0.0, 2.0], [1.0, 0.0]])
    assert rnn.loss_function(pred, true) == pytest.approx(1.0 + 0.0 + 1.0 + 0.25)


def test_attention_rows_sum_to_one_and_padding_gets_zero(reverser):
    lengths = (10, 4, 7, 1)
    X = [np.eye(VOCAB)[np.arange(n) % VOCAB] for n in lengths]
    _, weights = reverser.predict_batch(X, return_attention=True)
    assert weights.shape == (4, LENGTH, max(lengths))
    for row, n in zip(weights, lengths):
        assert np.allclose(row.sum(-1), 1.0, atol=1e-5)
        assert np.all(row[:, n:] == 0.0)
    outputs, single = reverser.predict(X[1], return_attention=True)
    assert single.shape == (LENGTH, 4) and np.allclose(single.sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("kwargs", [
    dict(attention="luong"),
    dict(attention="bahdanau", cell="gru", bidirectional=True),
    dict(cell="lstm", num_layers=2, bidirectional=True),
    dict(attention="luong", loss="cross_entropy", apply_softmax=True),
])
def test_padding_invariance(kwargs):
    rnn = untrained(**kwargs)
    X = ragged_inputs()
    batch = rnn.predict_batch(X, length=6)
    for i, x in enumerate(X):
        alone = np.stack([y[:, 0] for y in rnn.predict(x, length=6)])
        np.testing.assert_allclose(batch[i], alone, atol=1e-5, rtol=1e-5)


def test_input_forms_are_equivalent():
    rnn = untrained(input_size=1, output_size=2)
    X = np.random.default_rng(0).normal(size=(3, 4))
    expected = rnn.predict_batch(X, length=3)  # (n, T)
    for same in (X[..., None], X[..., None, None], [list(x) for x in X],
                 [[np.array([[v]]) for v in x] for x in X]):
        np.testing.assert_array_equal(rnn.predict_batch(same, length=3), expected)


def test_train_sets_train_mode_and_predict_eval_mode():
    rnn = untrained(dropout=0.3)
    modes: list[bool] = []
    forward = rnn.model.forward

    def recording_forward(*args, **kwargs):
        modes.append(rnn.model.training)
        return forward(*args, **kwargs)

    rnn.model.forward = recording_forward
    X, Y = np.zeros((4, 3, 3)), np.zeros((4, 2, 4))
    rnn.train(X, Y, epochs=2, learning_rate=1e-3, batch_size=2,
              periodic_callback=lambda: rnn.predict(X[0]), callback_every=1, verbose=False)
    assert modes and all(modes)  # every update in train mode, after each callback too
    assert not rnn.model.training
    rnn.model.train()
    rnn.predict_batch(X)
    assert not rnn.model.training


def test_callback_schedule_learning_rate_decay_and_progress(capsys, monkeypatch):
    rnn = untrained()
    X, Y = np.zeros((6, 3, 3)), np.zeros((6, 2, 4))
    optimizers = []
    make = simple._make_optimizer
    monkeypatch.setattr(simple, "_make_optimizer", lambda *a: optimizers.append(make(*a)) or optimizers[-1])
    rates: list[float] = []
    history = rnn.train(X, Y, epochs=20, learning_rate=0.1, decay_rate=0.5, callback_every=5,
                        periodic_callback=lambda: rates.append(optimizers[0].param_groups[0]["lr"]),
                        verbose=False)
    assert len(history) == 20
    # before training, then after epochs 5, 10, 15, 20 (0-based 4, 9, 14, 19)
    assert rates == pytest.approx([0.1] + [0.1 / (1 + 0.5 * e) for e in (4, 9, 14, 19)])
    assert capsys.readouterr().err == ""
    rnn.train(X, Y, epochs=2, learning_rate=0.1, verbose=True)
    assert "loss" in capsys.readouterr().err


def test_integer_class_targets_equal_one_hot_targets():
    X = np.random.default_rng(0).normal(size=(8, 4, 3))
    classes = np.random.default_rng(1).integers(0, 4, (8, 2))
    runs = []
    for Y in (classes, np.eye(4)[classes], np.eye(4)[classes][..., None]):
        rnn = untrained(loss="cross_entropy")
        runs.append(rnn.train(X, Y, epochs=3, learning_rate=1e-2, batch_size=4, verbose=False))
    assert runs[0] == runs[1] == runs[2]


def test_sgd_optimizer_learns_to_copy_unseen_sequences():
    """Plain SGD learns a task, not merely a lower loss: copying sequences of 4 symbols, every
    token of 32 unseen sequences right. Adam with the same settings takes another path."""
    tokens = np.random.default_rng(0).integers(0, 4, (96, 3))
    X, Y = np.eye(4)[tokens], tokens.copy()
    rnn = untrained(input_size=4, loss="cross_entropy")
    history = rnn.train(X[:64], Y[:64], epochs=60, learning_rate=1.0, optimizer="sgd", batch_size=16,
                        verbose=False)
    assert history[0] > 1.2 and history[-1] < 0.05  # from chance, ln 4 = 1.39, to near zero
    assert np.array_equal(rnn.predict_batch(X[64:]).argmax(-1), Y[64:])
    adam = untrained(input_size=4, loss="cross_entropy").train(
        X[:64], Y[:64], epochs=2, learning_rate=1.0, batch_size=16, verbose=False)
    assert adam != history[:2]


# -- determinism ------------------------------------------------------------------------------
def test_fixed_seed_repeats_exactly_and_leaves_global_rng_alone():
    X = ragged_inputs(lengths=(5, 2, 7, 1, 4, 3))
    Y = np.random.default_rng(2).integers(0, 4, (6, 3))
    state = torch.get_rng_state()
    results = []
    for seed in (7, 7, 8):
        rnn = untrained(loss="cross_entropy", seed=seed, dropout=0.2, attention="bahdanau")
        history = rnn.train(X, Y, epochs=3, learning_rate=1e-2, batch_size=2, verbose=False)
        results.append((history, rnn.predict_batch(X)))
    assert results[0][0] == results[1][0]
    np.testing.assert_array_equal(results[0][1], results[1][1])
    assert results[0][0] != results[2][0]
    assert torch.equal(torch.get_rng_state(), state)


# -- saving -----------------------------------------------------------------------------------
def test_save_then_load_gives_identical_predictions(reverser, tmp_path):
    folder = tmp_path / "model"
    reverser.save(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "settings.json"]
    settings = json.loads((folder / "settings.json").read_text())
    assert settings["target_length"] == LENGTH and settings["attention"] == "luong"
    loaded = EncoderDecoderRNN.load(folder, device="cpu")
    X, _ = reversal_data(20, seed=3)
    np.testing.assert_array_equal(loaded.predict_batch(X), reverser.predict_batch(X))
    a, wa = loaded.predict(X[0], return_attention=True)
    b, wb = reverser.predict(X[0], return_attention=True)
    np.testing.assert_array_equal(np.array(a), np.array(b))
    np.testing.assert_array_equal(wa, wb)


def test_nothing_is_written_unless_asked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rnn = untrained()
    rnn.train(np.zeros((2, 3, 3)), np.zeros((2, 2, 4)), epochs=1, learning_rate=1e-3, verbose=False)
    rnn.predict_batch(np.zeros((2, 3, 3)))
    assert list(tmp_path.iterdir()) == []


def test_load_rejects_unknown_settings_and_mismatched_tensors(tmp_path):
    rnn = untrained()
    rnn.save(tmp_path)
    settings = json.loads((tmp_path / "settings.json").read_text())

    (tmp_path / "settings.json").write_text(json.dumps({**settings, "colour": "red"}))
    with pytest.raises(ValueError, match="unknown setting.*colour"):
        EncoderDecoderRNN.load(tmp_path)

    (tmp_path / "settings.json").write_text(json.dumps({**settings, "hidden_size": 8}))
    with pytest.raises(ValueError, match=r"'[\w.]+' has shape \(\d+"):
        EncoderDecoderRNN.load(tmp_path)

    (tmp_path / "settings.json").write_text(json.dumps({**settings, "cell": "lstm"}))
    with pytest.raises(ValueError, match=r"'[\w.]+' has shape \(16"):
        EncoderDecoderRNN.load(tmp_path)

    (tmp_path / "settings.json").write_text(json.dumps({**settings, "loss": "hinge"}))
    with pytest.raises(ValueError, match="unknown loss"):
        EncoderDecoderRNN.load(tmp_path)

    (tmp_path / "settings.json").write_text("not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        EncoderDecoderRNN.load(tmp_path)

    with pytest.raises(ValueError, match="not found"):
        EncoderDecoderRNN.load(tmp_path / "missing")


# -- bad input --------------------------------------------------------------------------------
GOOD_X, GOOD_Y = np.zeros((4, 5, 3)), np.zeros((4, 2, 4))


@pytest.mark.parametrize("make, match", [
    (lambda: untrained(loss="hinge"), "unknown loss 'hinge'.*'mse' or 'cross_entropy'"),
    (lambda: untrained(cell="transformer"), "unknown cell 'transformer'"),
    (lambda: untrained(attention="fancy"), "unknown attention 'fancy'"),
    (lambda: untrained(input_size=0), "input_size must be a positive integer"),
    (lambda: untrained(hidden_size=2.5), "hidden_size must be a positive integer"),
    (lambda: untrained(dropout=1.0), "dropout must be"),
    (lambda: untrained(device="tpu"), "unknown device"),
])
def test_bad_settings_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("X, Y, match", [
    (np.zeros((4, 5, 2)), GOOD_Y, "X has 2 features per step.*input_size is 3"),
    (GOOD_X, np.zeros((4, 2, 7)), "Y has 7 values per step.*output_size is 4"),
    (GOOD_X, np.zeros((3, 2, 4)), "X has 4 sequences but Y has 3"),
    (np.full((4, 5, 3), np.nan), GOOD_Y, "X contains NaN or infinite"),
    (GOOD_X, np.full((4, 2, 4), np.inf), "Y contains NaN or infinite"),
    ([[[0.0] * 3] * 5, [[np.nan] * 3] * 2], GOOD_Y[:2], r"X\[1\] contains NaN"),
    (np.zeros((0, 5, 3)), GOOD_Y, "X is empty"),
    ([], GOOD_Y, "X is empty"),
    (GOOD_X, np.zeros((4, 0, 4)), "Y is empty"),
    ([np.zeros((3, 3)), np.zeros((0, 3))], GOOD_Y[:2], r"X\[1\] is empty"),
    (np.full((4, 5, 3), "a"), GOOD_Y, "X must contain numbers, got dtype <U1"),
    (GOOD_X, np.array([[object()] * 2] * 4), "Y must contain numbers, got dtype object"),
    (np.zeros((4, 5)), GOOD_Y, r"X has shape \(4, 5\): expected \(n, T, 3\)"),
    (np.zeros((4, 5, 3, 2, 1)), GOOD_Y, "X has shape"),
    (GOOD_X, np.zeros(4), r"Y has shape \(4,\)"),
    (GOOD_X, np.zeros((4, 2), dtype=int), r"Y has shape \(4, 2\)"),  # classes need cross-entropy
    (GOOD_X, [np.zeros((2, 4)), np.zeros((3, 4)), np.zeros((2, 4)), np.zeros((2, 4))],
     "Y's sequences have different lengths"),
])
def test_bad_training_data_raises(X, Y, match):
    with pytest.raises(ValueError, match=match):
        untrained().train(X, Y, epochs=1, learning_rate=1e-3, verbose=False)


def test_values_past_float32_are_refused_with_their_position():
    """1e39 is finite in float64 and inf in float32: it is checked after the conversion."""
    X, Y = GOOD_X.copy(), GOOD_Y.copy()
    X[2, 3, 1] = 1e39
    with pytest.raises(ValueError, match=r"X contains NaN or infinite values: expected finite numbers; "
                                         r"X\[2, 3, 1\] is 1e\+39, past float32's largest value 3.4e\+38"):
        untrained().train(X, GOOD_Y, epochs=1, learning_rate=1e-3, verbose=False)
    Y[1, 0, 3] = -1e300
    with pytest.raises(ValueError, match=r"Y\[1, 0, 3\] is -1e\+300, past float32's"):
        untrained().train(GOOD_X, Y, epochs=1, learning_rate=1e-3, verbose=False)
    with pytest.raises(ValueError, match=r"X\[1\]\[0, 2\] is 1e\+39"):
        untrained().predict_batch([np.zeros((2, 3)), [[0, 0, 1e39]]], length=1)
    with pytest.raises(ValueError, match=r"x\[1, 0\] is nan"):
        untrained().predict(np.array([[0.0, 0, 0], [np.nan, 0, 0]]), length=1)


@pytest.mark.parametrize("Y, match", [
    (np.full((4, 2), 4), "class ids from 4 to 4: expected 0 to 3"),
    (np.full((4, 2, 4), 0.5), "probability vectors"),
])
def test_bad_cross_entropy_targets_raise(Y, match):
    with pytest.raises(ValueError, match=match):
        untrained(loss="cross_entropy").train(GOOD_X, Y, epochs=1, learning_rate=1e-3,
                                               verbose=False)


@pytest.mark.parametrize("kwargs, match", [
    (dict(epochs=0), "epochs must be a positive integer"),
    (dict(learning_rate=-1.0), "learning_rate must be a positive number"),
    (dict(learning_rate="fast"), "learning_rate must be a positive number"),
    (dict(decay_rate=-0.1), "decay_rate must be a number >= 0"),
    (dict(optimizer="rmsprop"), "unknown optimizer 'rmsprop'"),
    (dict(batch_size=0), "batch_size must be a positive integer"),
    (dict(periodic_callback=3), "periodic_callback must be callable"),
])
def test_bad_training_arguments_raise(kwargs, match):
    args = dict(epochs=1, learning_rate=1e-3, verbose=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        untrained().train(GOOD_X, GOOD_Y, **args)


def test_bad_prediction_requests_raise():
    rnn = untrained()
    with pytest.raises(ValueError, match="not been trained yet: give the output length"):
        rnn.predict(np.zeros((5, 3)))
    with pytest.raises(ValueError, match="return_attention needs a model built with attention"):
        rnn.predict(np.zeros((5, 3)), length=2, return_attention=True)
    with pytest.raises(ValueError, match="length must be a positive integer"):
        rnn.predict(np.zeros((5, 3)), length=0)
    with pytest.raises(ValueError, match="4 features per step.*use predict_batch for many"):
        untrained(input_size=1).predict(np.zeros((3, 4)), length=2)
    with pytest.raises(ValueError, match="x contains NaN"):
        rnn.predict(np.full((5, 3), np.nan), length=2)
    with pytest.raises(ValueError, match=r"Y_pred has shape \(2, 4\) but Y_true has \(3, 4\)"):
        rnn.loss_function(np.zeros((2, 4)), np.zeros((3, 4)))


# -- a failed training keeps the last good weights; save never writes broken ones ------------------
def _weights(rnn: EncoderDecoderRNN) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in rnn.model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_diverging_training_keeps_the_weights_from_before_and_save_refuses_nan(tmp_path):
    X, Y = reversal_data(64, seed=1)
    rnn = EncoderDecoderRNN(VOCAB, 16, VOCAB, loss="cross_entropy", seed=0, device="cpu")
    rnn.train(X, Y, epochs=2, learning_rate=0.01, verbose=False)
    rnn.save(tmp_path / "good")
    saved = {p.name: p.read_bytes() for p in (tmp_path / "good").iterdir()}
    before, prediction = _weights(rnn), rnn.predict(X[0])
    with pytest.raises(FloatingPointError, match=r"training diverged: .* in epoch 0; the model keeps "
                                                 r"its last good weights, those from before this call"):
        rnn.train(X, Y, epochs=5, learning_rate=1e38, batch_size=16, verbose=False)  # Adam: NaN at once
    assert _same(_weights(rnn), before)
    assert all(np.array_equal(a, b) for a, b in zip(rnn.predict(X[0]), prediction))
    rnn.save(tmp_path / "kept")  # the kept weights are finite: saved as they are
    assert _same(_weights(EncoderDecoderRNN.load(tmp_path / "kept", device="cpu")), before)

    with torch.no_grad():
        next(rnn.model.parameters()).view(-1)[0] = float("nan")
    first = next(name for name, _ in rnn.model.named_parameters())
    with pytest.raises(ValueError, match=rf"the weight {first} holds NaN or infinite values .*not saved"):
        rnn.save(tmp_path / "good")
    with pytest.raises(ValueError, match="holds NaN"):
        rnn.save(tmp_path / "new")
    assert {p.name: p.read_bytes() for p in (tmp_path / "good").iterdir()} == saved
    assert not (tmp_path / "new").exists()
    loaded = EncoderDecoderRNN.load(tmp_path / "good", device="cpu")
    assert _same(_weights(loaded), before)


def test_a_training_that_diverges_later_keeps_the_weights_of_its_last_good_epoch():
    """The weights go bad after epoch 1 (a callback poisons one, as a diverging step would);
    epoch 2's loss is NaN, and the model is back at its weights after epoch 1."""
    X, Y = reversal_data(64, seed=2)
    rnn = EncoderDecoderRNN(VOCAB, 16, VOCAB, loss="cross_entropy", seed=0, device="cpu")
    after: list[dict[str, torch.Tensor]] = []

    def poison_after_epoch_1() -> None:
        after.append(_weights(rnn))
        if len(after) == 3:  # called before training, after epoch 0, after epoch 1
            with torch.no_grad():
                next(rnn.model.parameters()).fill_(float("inf"))

    with pytest.raises(FloatingPointError, match=r"in epoch 2; .*those after epoch 1") as failure:
        rnn.train(X, Y, epochs=5, learning_rate=0.01, periodic_callback=poison_after_epoch_1,
                  callback_every=1, verbose=False)
    assert _same(_weights(rnn), after[2]) and len(failure.value.history) == 2
    assert all(np.isfinite(step).all() for step in rnn.predict(X[0]))


def test_predict_length_is_bounded_with_an_error_naming_it():
    rnn = untrained()
    with pytest.raises(ValueError, match=r"length must be at most 100,000 output steps \(MAX_LENGTH\), "
                                         r"got 1,000,000,000"):
        rnn.predict(np.zeros((5, 3)), length=10**9)
    with pytest.raises(ValueError, match=r"length=100,000 for 20,000 sequence\(s\) asks for 8,000,000,000 "
                                         r"output values, more than the 1,073,741,824"):
        rnn.predict_batch(np.zeros((20_000, 2, 3)), length=100_000)
    assert len(rnn.predict(np.zeros((5, 3)), length=simple.MAX_LENGTH // 1000)) == 100
