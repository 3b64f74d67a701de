"""Decoding speed and quality on test_2016_flickr: greedy and beam 5, fp32 and int8.

    python benchmarks/decode_speed.py --model-dir runs/multi30k_en_de

Variants: fp32, int8 dynamic quantization of the linear layers, and bf16 (on CPU the output
layer's product, on a GPU autocast: ``Translator._autocast``).
Each variant runs in its own process, so its peak resident memory is that of decoding alone,
and decodes the test set ``--repeat`` times (3); the fastest run counts, as with ``timeit``.
For beam 5 it also reports the compute bound: the output layer's FLOPs (the largest matrix
product of a step) times beam times output tokens, at the measured matmul peak.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from common import DATA_DIR, ROOT, matmul_peak, peak_rss_gib, print_header, record, turn_off_paths

# name: (beam, int8 dynamic quantization, bf16)
VARIANTS = {"greedy": (1, False, False), "beam5": (5, False, False),
            "greedy-int8": (1, True, False), "beam5-int8": (5, True, False),
            "greedy-bf16": (1, False, True), "beam5-bf16": (5, False, True)}


def measure(model_dir: str, variant: str, batch_size: int | None, repeat: int = 3) -> dict:
    from seq2seq.data.text import read_lines
    from seq2seq.decoding.scores import score_translations
    from seq2seq.decoding.translator import Translator
    from seq2seq.kernels.ops import keep_freed_memory

    keep_freed_memory()  # as the seq2seq command does

    beam, quantize, bf16 = VARIANTS[variant]
    translator = Translator.load(model_dir, quantize=quantize, precision="bf16" if bf16 else "fp32")
    if batch_size:
        translator.config.decode.batch_size = batch_size
    src = read_lines(DATA_DIR / f"test_2016_flickr.{translator.config.data.src_lang}.gz")
    ref = read_lines(DATA_DIR / f"test_2016_flickr.{translator.config.data.tgt_lang}.gz")
    translator.translate(src[:50], beam=beam)  # warm-up
    seconds = float("inf")
    for _ in range(repeat):  # the fastest of a few runs, as timeit does: less noise
        start = time.perf_counter()
        hyps = translator.hypotheses(src, beam=beam)
        seconds = min(seconds, time.perf_counter() - start)
    out = [translator.tgt_tok.decode(h[0].tokens) for h in hyps]
    tokens = sum(len(h[0].tokens) + 1 for h in hyps)
    generator = translator.model.generator
    out_flops = 2 * generator.in_features * generator.out_features if hasattr(generator, "in_features") \
        else 2 * translator.model.decoder.output_size * len(translator.tgt_tok)
    return {"variant": variant, "sentences_per_s": len(src) / seconds, "seconds": seconds,
            "bleu": score_translations(out, ref)["bleu"],
            "bleu_lc": score_translations(out, ref, lowercase=True)["bleu"],
            "output_tokens": tokens, "output_layer_flops": out_flops * beam * tokens,
            "peak_rss_gib": peak_rss_gib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=str(ROOT / "runs/multi30k_en_de"))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--batch-size", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="runs per variant; the fastest counts")
    parser.add_argument("--without", default="", help="fast paths to turn off, comma-separated "
                        "(seq2seq.kernels.FastPaths fields; kernel_share.py uses this)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        turn_off_paths([name for name in args.without.split(",") if name])
        print(json.dumps(measure(args.model_dir, args.one, args.batch_size, args.repeat)))
        return
    print_header()
    results = []
    for variant in args.variants.split(","):
        cmd = [sys.executable, __file__, "--model-dir", args.model_dir, "--one", variant,
               "--batch-size", str(args.batch_size), "--repeat", str(args.repeat), "--without", args.without]
        results.append(json.loads(subprocess.run(cmd, check=True, capture_output=True,
                                                 text=True).stdout.strip().splitlines()[-1]))
    peak = matmul_peak()
    rows = [("fp32 matmul peak measured", f"{peak / 1e9:.1f} GFLOP/s")]
    for r in results:
        rows.append((f"{r['variant']}: sentences/s", f"{r['sentences_per_s']:.0f} "
                     f"(BLEU {r['bleu']:.2f}, lowercased {r['bleu_lc']:.2f}; "
                     f"peak memory {r['peak_rss_gib']:.2f} GiB)"))
        if r["variant"] == "beam5":
            bound = r["output_layer_flops"] / peak
            rows.append(("beam5: output-layer compute bound", f"{bound:.2f} s, i.e. "
                         f"{1000 / bound:.0f} sentences/s; reached {100 * bound / r['seconds']:.0f}%"))
    without = f", without {args.without}" if args.without else ""
    record(f"Decoding test_2016_flickr, {args.model_dir}{without}", rows)


if __name__ == "__main__":
    main()
