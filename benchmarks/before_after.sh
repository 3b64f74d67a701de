#!/usr/bin/env bash
# Before and after a change, alternating in one session so that the machine's drift hits both:
# train_speed.py and decode_speed.py of two checkouts, each with its own virtual environment.
#
#   benchmarks/before_after.sh BEFORE_DIR AFTER_DIR MODEL_DIR
#
# BEFORE_DIR, AFTER_DIR: checkouts (e.g. `git archive COMMIT | tar -x -C DIR`), each with
# `.venv` holding its own editable install. MODEL_DIR: a trained model that both can load, for
# decoding. Settings from the environment: VARIANTS (decode_speed.py variants, default
# "greedy,beam5,beam5-bf16"), CONFIGS (space-separated config names, default
# "multi30k_en_de multi30k_en_de_joey"), ROUNDS (default 2), DATA_DIR (Multi30k).
# It prints the figures only (NO_RECORD=1): copy the table into RESULTS.md with the commits.
set -euo pipefail
before="$1" after="$2" model_dir="$3"
export DATA_DIR="${DATA_DIR:-$(cd "$(dirname "$0")/.." && pwd)/../shared/data/multi30k}" NO_RECORD=1
for round in $(seq "${ROUNDS:-2}"); do
  for side in "$before" "$after"; do
    for config in ${CONFIGS:-multi30k_en_de multi30k_en_de_joey}; do
      echo "== round $round, $side, train $config, $(date -u +%T)"
      "$side/.venv/bin/python" "$side/benchmarks/train_speed.py" --config "$side/configs/$config.yaml" \
        --steps 150 | grep -E "tokens/s|sentences/s|peak resident"
    done
    echo "== round $round, $side, decode, $(date -u +%T)"
    "$side/.venv/bin/python" "$side/benchmarks/decode_speed.py" --model-dir "$model_dir" \
      --variants "${VARIANTS:-greedy,beam5,beam5-bf16}" --batch-size 1000 | grep -E "sentences/s"
  done
done
