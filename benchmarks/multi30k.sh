#!/usr/bin/env bash
# Multi30k English -> German on this machine: train configs/multi30k_en_de.yaml for a fixed
# time budget, then score test_2016_flickr with beam 5 (sacreBLEU on detokenized output, cased
# and lowercased, and chrF), and append the figures to benchmarks/RESULTS.md.
#
#   benchmarks/multi30k.sh                     # 30 minutes, into runs/multi30k_en_de
#
# Settings, from the environment:
#   DATA_DIR     the Multi30k files (default: ../shared/data/multi30k from the repository root)
#   MODEL_DIR    where the run goes (default: runs/multi30k_en_de); it must not hold a run yet,
#                unless OVERWRITE=1, which deletes that run first
#   MAX_MINUTES  the training time budget (default: 30)
#   CONFIG       the config (default: configs/multi30k_en_de.yaml)
#   SET          space-separated config overrides for training, e.g. "train.precision=bf16"
#   BEAM         the beam for the test set (default: 5)
#   RESULTS      the Markdown file the section is appended to (default: benchmarks/RESULTS.md)
#   PYTHON       the interpreter with seq2seq installed (default: python)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DATA_DIR="${DATA_DIR:-$ROOT/../shared/data/multi30k}"
MODEL_DIR="${MODEL_DIR:-runs/multi30k_en_de}"
MAX_MINUTES="${MAX_MINUTES:-30}"
CONFIG="${CONFIG:-configs/multi30k_en_de.yaml}"
BEAM="${BEAM:-5}"
RESULTS="${RESULTS:-benchmarks/RESULTS.md}"
PYTHON="${PYTHON:-python}"
TEST_SRC="$DATA_DIR/test_2016_flickr.en.gz"
TEST_REF="$DATA_DIR/test_2016_flickr.de.gz"

die() { echo "multi30k.sh: error: $*" >&2; exit 1; }

[[ -f "$CONFIG" ]] || die "no config at $CONFIG"
for file in train.en.gz train.de.gz val.en.gz val.de.gz test_2016_flickr.en.gz test_2016_flickr.de.gz; do
  [[ -f "$DATA_DIR/$file" ]] || die "missing $DATA_DIR/$file (set DATA_DIR to the Multi30k folder)"
done
if [[ -e "$MODEL_DIR/last.safetensors" || -e "$MODEL_DIR/config.yaml" ]]; then
  [[ "${OVERWRITE:-0}" == 1 ]] || die "$MODEL_DIR already holds a run: set OVERWRITE=1 to delete it, or choose another MODEL_DIR"
  rm -rf -- "$MODEL_DIR"
fi
mkdir -p "$MODEL_DIR" "$(dirname "$RESULTS")"

# CPU model, flags (AVX-512 or AVX2), threads and torch version, one "- key: value" line each
machine_lines="$(cd benchmarks && "$PYTHON" -c 'import common
for key, value in common.machine_facts().items(): print(f"- {key}: {value}")')"
echo "$machine_lines"
started="$(date -u '+%Y-%m-%d %H:%M UTC')"
anchor="e$(date -u '+%Y%m%d-%H%M')-multi30k-$(basename "$CONFIG" .yaml | tr -c 'a-z0-9\n' '-')"
commit="$(cd benchmarks && "$PYTHON" -c 'import common; print(common.git_commit())')"

train_cmd=("$PYTHON" -m seq2seq train --config "$CONFIG" --data-dir "$DATA_DIR" --model-dir "$MODEL_DIR"
           --max-minutes "$MAX_MINUTES")
for override in ${SET:-}; do train_cmd+=(--set "$override"); done
echo "== training: ${train_cmd[*]}"
t0="$(date +%s)"
"${train_cmd[@]}" 2>&1 | tee "$MODEL_DIR/train.log"
wall_s=$(( $(date +%s) - t0 ))

eval_cmd=("$PYTHON" -m seq2seq evaluate --model-dir "$MODEL_DIR" --src "$TEST_SRC" --ref "$TEST_REF" --beam "$BEAM")
echo "== evaluating: ${eval_cmd[*]} [--lowercase]"
cased_json="$("${eval_cmd[@]}")"
lower_json="$("${eval_cmd[@]}" --lowercase)"

# One Python call reads both results and metrics.jsonl (skipping torn lines) and prints
# shell assignments of the figures (assigned first, so that a failure stops the script).
figures="$("$PYTHON" - "$MODEL_DIR/metrics.jsonl" "$cased_json" "$lower_json" <<'EOF'
import json, shlex, sys

path, cased, lower = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
entries = []
with open(path, encoding="utf-8") as handle:
    for line in handle:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and "elapsed_s" in entry and "tokens" in entry:
            entries.append(entry)
if not entries:
    sys.exit(f"{path}: no metrics logged")
last = max(entries, key=lambda e: (e["step"], e["elapsed_s"]))
valid = [e for e in entries if "valid_bleu" in e]
best = max(valid, key=lambda e: e["valid_bleu"]) if valid else {}
figures = {
    "bleu": cased["bleu"], "bleu_lc": lower["bleu"], "chrf": cased["chrf"],
    "signature": cased["signature"], "signature_lc": lower["signature"],
    "chrf_signature": cased.get("chrf_signature", ""),
    "sentences_per_s": cased["sentences_per_s"], "test_sentences": cased["sentences"],
    "steps": last["step"], "epochs": last["epoch"], "tokens": last["tokens"],
    "train_s": round(last["elapsed_s"]), "train_min": round(last["elapsed_s"] / 60, 1),
    "tokens_per_s": round(last["tokens"] / max(last["elapsed_s"], 1e-9)),
    "best_valid_bleu": best.get("valid_bleu", "n/a"), "best_step": best.get("step", "n/a"),
}
for key, value in figures.items():
    print(f"{key}={shlex.quote(str(value))}")
EOF
)"
eval "$figures"
stop_reason="$(grep -o 'training finished: [^;]*' "$MODEL_DIR/train.log" | tail -1 | sed 's/training finished: //' || true)"

section="
<a id=\"${anchor}\"></a>

### Multi30k en→de, $(basename "$CONFIG")${SET:+ ($SET)}, ${MAX_MINUTES} minutes, ${started}

- commit: ${commit}
${machine_lines}
- command: \`MAX_MINUTES=${MAX_MINUTES} CONFIG=${CONFIG}${SET:+ SET=\"$SET\"} MODEL_DIR=${MODEL_DIR} benchmarks/multi30k.sh\`, that is \`${train_cmd[*]}\`, then \`${eval_cmd[*]}\` (and \`--lowercase\`)
- test_2016_flickr (${test_sentences} sentences), beam ${BEAM}: **BLEU ${bleu}** (cased, detokenized sacreBLEU), BLEU ${bleu_lc} lowercased, chrF ${chrf}
- signature: \`${signature}\`; lowercased: \`${signature_lc}\`; chrF: \`${chrf_signature}\`
- training: ${train_min} min (${train_s} s) of training time (${wall_s} s wall clock with tokenizer and startup), ${steps} steps, epoch ${epochs}, stopped: ${stop_reason:-unknown}; best validation BLEU ${best_valid_bleu} at step ${best_step}
- throughput: ${tokens_per_s} target tokens/s in training (${tokens} tokens / ${train_s} s, from metrics.jsonl); decoding ${sentences_per_s} sentences/s at beam ${BEAM}
"
printf '%s' "$section" >> "$RESULTS"
echo "$section"
echo "== appended to $RESULTS"
