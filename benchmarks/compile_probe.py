"""torch.compile (Inductor's CPU code) of the model in training, against eager: compile time and speed.

    python benchmarks/compile_probe.py configs/multi30k_en_de_fast.yaml eager 250
    python benchmarks/compile_probe.py configs/multi30k_en_de_fast.yaml compile 250

MODE: ``eager``; ``compile`` (``model.compile()``, the forward with the loss, automatic dynamic
shapes: a second length recompiles once with symbolic sizes); ``compile-static`` (a graph per
shape). Trains STEPS updates on Multi30k (no validation) with the config's kernels and
precision and prints one JSON line: the wall time, the training clock at a few updates (the
first ones include compiling) and target tokens/s over the second half of the updates. It
does not record: issue 24's lever 2 in RESULTS.md quotes its output. torch.compile is not in
the package: on 2026-12-04 it trained slower than eager after minutes of compiling.
"""

import json
import sys
import tempfile
import time
from pathlib import Path

from common import DATA_DIR

import seq2seq.training.loop as loop
from seq2seq.config import Config
from seq2seq.kernels.ops import keep_freed_memory

config_path, mode, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
overrides = sys.argv[4:]
keep_freed_memory()
build = loop.build_model


def build_compiled(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
    model = build(*args, **kwargs)
    if mode.startswith("compile"):
        model.compile(dynamic=None if mode == "compile" else False)
    return model


loop.build_model = build_compiled
config = Config.load(config_path).override(overrides)
config.train.max_steps = steps
config.train.log_every = 1
config.data.valid_src = config.data.valid_tgt = ""
with tempfile.TemporaryDirectory() as model_dir:
    start = time.perf_counter()
    loop.train(config, model_dir, data_dir=DATA_DIR)
    wall = time.perf_counter() - start
    lines = [json.loads(x) for x in (Path(model_dir) / "metrics.jsonl").read_text().splitlines()]
by_step = {x["step"]: x for x in lines if "train_loss" in x}
marks = {s: by_step[s]["elapsed_s"] for s in (1, 10, 20, 50, 100, steps) if s in by_step}
half = by_step[steps // 2]
late = (by_step[steps]["tokens"] - half["tokens"]) / (by_step[steps]["elapsed_s"] - half["elapsed_s"])
print(json.dumps({"mode": mode, "wall": wall, "elapsed_at": marks, "late_tok_s": late,
                  "loss": by_step[steps]["train_loss"]}))
