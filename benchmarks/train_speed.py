"""Training throughput: sentences/s, target tokens/s, model FLOP/s, and their share of the matmul peak.

    python benchmarks/train_speed.py --config configs/multi30k_en_de.yaml --steps 150

Trains for ``warmup + steps`` updates on Multi30k (no validation) and times the last
``steps`` from metrics.jsonl. Sentences/s counts the pairs of the timed batches: unlike
target tokens, which depend on the tokenizer (sentencepiece pieces here, Moses words for
JoeyNMT and OpenNMT-py), it compares the same work across toolkits. FLOPs are counted
analytically from the matrix products of the batches actually trained
(``Seq2Seq.estimate_flops``, x3 for forward and backward) and set against the fp32
matrix-product peak measured in the same run, as nanoGPT's estimate_mfu does.

Processes against threads: ``torchrun --standalone --nproc_per_node=2 benchmarks/train_speed.py
--model-dir DIR --set train.max_sentences=32 ...`` trains data-parallel, one thread a process,
the same 64 sentences an update as one process with batches of 64 (rank 0 reports, its memory).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
from pathlib import Path

from common import DATA_DIR, ROOT, matmul_peak, peak_rss_gib, print_header, record, turn_off_paths

from seq2seq.config import Config
from seq2seq.data.batches import encode_corpus, make_batches
from seq2seq.data.text import read_parallel
from seq2seq.data.tokenizers import PAD_ID, load_tokenizers
from seq2seq.kernels.ops import keep_freed_memory
from seq2seq.models.builder import build_model
from seq2seq.training.loop import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/multi30k_en_de.yaml"))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--without", default="", help="fast paths to turn off, comma-separated "
                        "(seq2seq.kernels.FastPaths fields; kernel_share.py uses this)")
    parser.add_argument("--json", action="store_true", help="print one JSON line, record nothing")
    parser.add_argument("--model-dir", default="", help="train there (default: a temporary folder); "
                        "needed under torchrun, where every process must train into one folder")
    args = parser.parse_args()
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world_size > 1 and not args.model_dir:
        parser.error("under torchrun give --model-dir: every process trains into that one folder")
    if not args.json and rank == 0:
        print_header()
    keep_freed_memory()  # as the seq2seq command does
    turn_off_paths([name for name in args.without.split(",") if name])

    config = Config.load(args.config).override(args.overrides)
    config.train.max_steps = args.warmup + args.steps
    config.train.log_every = 1
    config.data.valid_src = config.data.valid_tgt = ""
    with contextlib.ExitStack() as stack:
        model_dir = args.model_dir or stack.enter_context(tempfile.TemporaryDirectory())
        train(config, model_dir, data_dir=DATA_DIR, overwrite=True)
        if rank != 0:  # rank 0 counts and reports for all
            return
        saved = Config.load(Path(model_dir) / "config.yaml")
        lines = [json.loads(x) for x in (Path(model_dir) / "metrics.jsonl").read_text().splitlines()]
        src_tok, tgt_tok = load_tokenizers(Path(model_dir))
    train_rss = peak_rss_gib()
    by_step = {x["step"]: x for x in lines if "train_loss" in x}
    first, last = by_step[args.warmup], by_step[args.warmup + args.steps]
    seconds = last["elapsed_s"] - first["elapsed_s"]
    tokens = last["tokens"] - first["tokens"]

    # the same batches again, to count their FLOPs
    src_lines, tgt_lines = read_parallel(saved.data.train_src, saved.data.train_tgt)
    corpus = encode_corpus(src_lines, tgt_lines, src_tok, tgt_tok, saved.data.max_len,
                           saved.data.long_pairs, log=lambda _m: None)
    t = saved.train
    group = world_size * t.accumulate  # the batches of one update, rank r's the r-th of them
    batches = make_batches([len(s) for s in corpus.src], [len(s) for s in corpus.tgt],
                           t.batch_tokens, t.max_sentences, seed=t.seed, epoch=0)
    model = build_model(saved.model, len(src_tok), len(tgt_tok), PAD_ID)
    flops, sentences = 0.0, 0
    for indices in batches[args.warmup * group:(args.warmup + args.steps) * group]:
        sentences += len(indices)
        src_len = max(len(corpus.src[i]) for i in indices)
        tgt_len = max(len(corpus.tgt[i]) for i in indices) + 1
        n = len(indices)
        flops += 3 * model.estimate_flops(n * src_len, n * tgt_len, n * src_len * tgt_len)
    if args.json:
        print(json.dumps({"sentences_per_s": sentences / seconds, "tokens_per_s": tokens / seconds,
                          "peak_rss_gib": train_rss}))
        return
    peak = matmul_peak()
    achieved = flops / seconds
    m = saved.model
    title = f"Training throughput, {Path(args.config).name} {' '.join(args.overrides)}".strip()
    if args.without:
        title += f", without {args.without}"
    shape = (f"{m.cell}, {m.encoder_layers}x{m.encoder_hidden_size or m.hidden_size} "
             f"{'bi-' if m.bidirectional else ''}encoder, decoder {m.hidden_size}, "
             f"attention {m.attention}, input feeding {m.input_feeding}, embed {m.embed_size}"
             if m.arch == "rnn" else
             f"transformer {m.encoder_layers}+{m.decoder_layers} layers, d_model {m.d_model}, "
             f"{m.heads} heads, FFN {m.ff_size}, {m.norm}-norm")
    record(title, [
        ("model", f"{shape}, vocab {len(src_tok)}/{len(tgt_tok)}, {model.num_parameters():,} parameters"),
        ("batch", f"{world_size} process(es) x {t.batch_tokens} target tokens, at most {t.max_sentences} "
                  f"sentences; {args.steps} timed updates after {args.warmup}"),
        ("precision", f"{t.precision} (train.precision {config.train.precision!r} as given)"),
        ("sentences/s", f"{sentences / seconds:,.0f}"),
        ("target tokens/s", f"{tokens / seconds:,.0f} ({tokens / sentences:.2f} a sentence)"),
        ("model FLOP/s (analytic, x3 fwd+bwd)", f"{achieved / 1e9:.1f} GFLOP/s"),
        ("fp32 matmul peak measured", f"{peak / 1e9:.1f} GFLOP/s"),
        ("share of peak (MFU)", f"{100 * achieved / peak:.1f}%"),
        ("peak resident memory (training process)", f"{train_rss:.2f} GiB"),
    ])


if __name__ == "__main__":
    main()
