"""The seed example's training, timed: wall seconds and how many of the 50 starts come out right.

    python benchmarks/seed_example.py [--runs 3] [--batch-size N] [--cell gru]

Same data and arguments as ``../shared/seed/progression_example.py``: hidden 200,
``epochs=500, learning_rate=0.0001, decay_rate=0.00001`` and the library's defaults, with its
``periodic_test`` every 10 epochs (silent here). The original NumPy implementation needed
about 185 s; the target on a 2-core machine is all 50 right in at most 15 s of training.
Each run seeds torch's global generator with its number, since the example seeds nothing.
Figures are set against the machine (fp32 matmul peak) and appended to RESULTS.md.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from common import matmul_peak, print_header, record

from seq2seq.vectors.model import SMALL_MODEL_THREADS, EncoderDecoderRNN

MAX_NUM, SEQUENCE_LEN, HIDDEN = 50, 10, 200
EPOCHS, LEARNING_RATE, DECAY_RATE = 500, 0.0001, 0.00001
NUMPY_SECONDS = 185.0  # the original NumPy implementation, same machine class


def progression(start: int) -> list[int]:
    """start, F(start), ... with F(x) = 3x mod 50: SEQUENCE_LEN + 1 numbers."""
    seq = [start]
    for _ in range(SEQUENCE_LEN):
        seq.append((seq[-1] * 3) % MAX_NUM)
    return seq


def seed_data() -> tuple[np.ndarray, np.ndarray]:
    """X (50, 10) normalised numbers, Y (50, 10, 50, 1) one-hot column vectors, as the seed."""
    sequences = np.array([progression(i) for i in range(MAX_NUM)])
    X = sequences[:, :-1] / MAX_NUM
    Y = np.eye(MAX_NUM)[sequences[:, 1:]][..., None]
    return X, Y


def run(seed: int, train_kwargs: dict, model_kwargs: dict) -> tuple[float, float, int]:
    """One training run: (wall seconds, CPU seconds, starts with the right last number)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    X, Y = seed_data()
    rnn = EncoderDecoderRNN(1, HIDDEN, MAX_NUM, apply_softmax=True, loss="cross_entropy",
                            **model_kwargs)

    def periodic_test() -> None:  # the seed's callback, without the printing
        seq = progression(int(rng.integers(MAX_NUM)))
        y_pred = rnn.predict(list(np.array(seq[:-1]) / MAX_NUM))
        rnn.loss_function(y_pred, np.eye(MAX_NUM)[seq[1:]][..., None])

    wall, cpu = time.perf_counter(), time.process_time()
    rnn.train(X, Y, epochs=EPOCHS, learning_rate=LEARNING_RATE, decay_rate=DECAY_RATE,
              periodic_callback=periodic_test, verbose=False, **train_kwargs)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    last = np.array([int(np.argmax(rnn.predict(x)[-1])) for x in X])
    right = int((last == np.array([progression(i)[-1] for i in range(MAX_NUM)])).sum())
    return wall, cpu, right


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1, help="runs with seeds 0, 1, ...")
    parser.add_argument("--batch-size", type=int, help="instead of the library's default")
    parser.add_argument("--cell", help="instead of the library's default")
    args = parser.parse_args()
    print_header()
    train_kwargs = {} if args.batch_size is None else {"batch_size": args.batch_size}
    model_kwargs = {} if args.cell is None else {"cell": args.cell}

    results = []
    for seed in range(args.runs):
        wall, cpu, right = run(seed, train_kwargs, model_kwargs)
        print(f"run {seed}: training {wall:.2f} s wall ({cpu:.2f} s CPU), {right}/50 right",
              flush=True)
        results.append((wall, cpu, right))
    walls = [r[0] for r in results]

    probe = EncoderDecoderRNN(1, HIDDEN, MAX_NUM, loss="cross_entropy", **model_kwargs)
    tokens = MAX_NUM * SEQUENCE_LEN  # source and target positions per epoch
    flops = 3 * EPOCHS * probe.model.estimate_flops(tokens, tokens, 0)  # forward + backward
    threads = torch.get_num_threads()
    torch.set_num_threads(SMALL_MODEL_THREADS)  # the peak of the threads training runs on
    peak = matmul_peak(device=str(probe.device))
    torch.set_num_threads(threads)
    best = min(walls)
    settings = ", ".join(f"{k}={v}" for k, v in {**model_kwargs, **train_kwargs}.items())
    record(f"Seed example (progression), {settings or 'library defaults'}", [
        ("model", f"{probe.cell}, hidden {HIDDEN}, {probe.model.num_parameters():,} parameters, "
                  f"device {probe.device}"),
        ("training wall time", " / ".join(f"{w:.2f} s" for w in walls)
         + f" (best {best:.2f} s; target <= 15 s)"),
        ("training CPU time", " / ".join(f"{r[1]:.2f} s" for r in results)),
        ("starts with the right last number", " / ".join(f"{r[2]}/50" for r in results)),
        ("speed-up on the NumPy original (185 s)", f"{NUMPY_SECONDS / best:.0f}x"),
        ("model FLOP/s (analytic, x3 fwd+bwd)", f"{flops / best / 1e9:.1f} GFLOP/s"),
        (f"fp32 matmul peak measured ({SMALL_MODEL_THREADS} thread, as in training)",
         f"{peak / 1e9:.1f} GFLOP/s"),
        ("share of peak (MFU)", f"{100 * flops / best / peak:.1f}%"),
    ])


if __name__ == "__main__":
    main()
