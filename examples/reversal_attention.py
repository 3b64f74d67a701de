"""Learn to reverse sequences with attention, then print where the decoder looks.

    python examples/reversal_attention.py

Inputs are one-hot digits (n, 10, 10), targets the same digits reversed as integer classes
(n, 10). After a few seconds of training the model reverses sequences it has never seen,
and its attention runs along the anti-diagonal: output step t reads input position 9 - t (or
its neighbour, whose encoder state still carries that digit).
"""

from __future__ import annotations

import numpy as np

from seq2seq import EncoderDecoderRNN

DIGITS, LENGTH = 10, 10


def make_data(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    tokens = rng.integers(0, DIGITS, (n, LENGTH))
    return np.eye(DIGITS)[tokens], tokens[:, ::-1].copy()


def main() -> None:
    rng = np.random.default_rng(0)
    X_train, Y_train = make_data(800, rng)
    X_test, Y_test = make_data(200, rng)

    rnn = EncoderDecoderRNN(DIGITS, 32, DIGITS, apply_softmax=True, loss="cross_entropy",
                            attention="luong", seed=0)
    rnn.train(X_train, Y_train, epochs=15, learning_rate=0.01, batch_size=32)

    predicted = rnn.predict_batch(X_test).argmax(-1)  # (200, LENGTH)
    print(f"token accuracy on unseen sequences: {(predicted == Y_test).mean():.1%}")

    x = X_test[0]
    outputs, weights = rnn.predict(x, return_attention=True)  # weights (LENGTH, LENGTH)
    print("input:   ", " ".join(str(d) for d in x.argmax(-1)))
    print("reversed:", " ".join(str(int(np.argmax(y))) for y in outputs))
    print("\nattention (rows: output steps, columns: input positions, x 10, rounded):")
    print("      " + " ".join(f"{j:2d}" for j in range(LENGTH)))
    for t, row in enumerate(weights):
        print(f"  {t:2d}  " + " ".join(f"{round(10 * w):2d}" for w in row))


if __name__ == "__main__":
    main()
