"""Page faults and tokens/s of training steps, with and without ``keep_freed_memory``.

    python benchmarks/page_faults.py --config configs/multi30k_en_de_fast.yaml

Each setting runs in its own process (glibc's malloc settings are per process): it trains
``--warmup`` steps, then counts the minor page faults and times ``--steps`` more, the same
batches in both. The runs alternate (off, on, off, on, ...) for ``--pairs`` pairs, since
this machine's speed drifts by more than the setting's effect on tokens/s; the fault counts
do not drift.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import DATA_DIR, ROOT, print_header, record


def measure(config_path: str, warmup: int, steps: int) -> dict:
    import torch

    from seq2seq.config import Config
    from seq2seq.data.batches import collate, encode_corpus, make_batches
    from seq2seq.data.text import read_parallel
    from seq2seq.data.tokenizers import PAD_ID, train_tokenizers
    from seq2seq.kernels.ops import keep_freed_memory
    from seq2seq.models.builder import build_model
    from seq2seq.training.schedule import make_adam

    applied = keep_freed_memory()  # False with SEQ2SEQ_KEEP_FREED_MEMORY=0
    config = Config.load(config_path)
    data, t = config.data, config.train
    torch.set_num_threads(os.cpu_count() or 1)
    src_lines, tgt_lines = read_parallel(DATA_DIR / data.train_src, DATA_DIR / data.train_tgt)
    with tempfile.TemporaryDirectory() as model_dir:
        src_tok, tgt_tok = train_tokenizers(data, src_lines, tgt_lines, Path(model_dir),
                                            log=lambda _m: None)
    corpus = encode_corpus(src_lines, tgt_lines, src_tok, tgt_tok, data.max_len,
                           data.long_pairs, log=lambda _m: None)
    batches = make_batches([len(s) for s in corpus.src], [len(s) for s in corpus.tgt],
                           t.batch_tokens, t.max_sentences, seed=t.seed, epoch=0)
    torch.manual_seed(t.seed)
    model = build_model(config.model, len(src_tok), len(tgt_tok), PAD_ID).train()
    optimizer = make_adam(model.parameters(), t.lr)

    def step(indices) -> int:
        batch = collate(indices, corpus.src, corpus.tgt)
        loss, _ = model(batch.src, batch.src_lengths, batch.tgt_in, tgt_out=batch.tgt_out,
                        label_smoothing=t.label_smoothing)
        (loss / batch.n_tokens).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return batch.n_tokens

    for indices in batches[:warmup]:
        step(indices)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    tokens = sum(step(indices) for indices in batches[warmup:warmup + steps])
    seconds = time.perf_counter() - start
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return {"applied": applied, "faults_per_step": faults / steps, "tokens_per_s": tokens / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/multi30k_en_de_fast.yaml"))
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    print_header()
    if args.one:
        print(json.dumps(measure(args.config, args.warmup, args.steps)))
        return
    results: dict[bool, list[dict]] = {False: [], True: []}
    for _ in range(args.pairs):
        for keep in (False, True):
            env = dict(os.environ, SEQ2SEQ_KEEP_FREED_MEMORY="1" if keep else "0")
            cmd = [sys.executable, __file__, "--one", "--config", args.config,
                   "--warmup", str(args.warmup), "--steps", str(args.steps)]
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
            results[keep].append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = [("config", Path(args.config).name),
            ("steps", f"{args.steps} timed after {args.warmup}, {args.pairs} runs each way")]
    for keep, name in ((False, "glibc default (SEQ2SEQ_KEEP_FREED_MEMORY=0)"),
                       (True, "keep_freed_memory")):
        runs = results[keep]
        rows.append((f"{name}: page faults per step",
                     ", ".join(f"{r['faults_per_step']:,.0f}" for r in runs)))
        rows.append((f"{name}: target tokens/s",
                     ", ".join(f"{r['tokens_per_s']:,.0f}" for r in runs)))
    record("Page faults of training steps, with and without keep_freed_memory", rows)


if __name__ == "__main__":
    main()
