#!/usr/bin/env bash
# One prepared check for a machine with a CUDA GPU, in under 5 minutes: the CUDA tests, Multi30k
# en->de trained for 2 minutes in fp32 and in bf16, test2016 decoded greedy and at beam 5. It
# prints the policy chosen for the device, sentences/s and BLEU.
#
#   benchmarks/gpu_check.sh [DATA_DIR]      (default: ../shared/data/multi30k)
#
# DEVICE (default cuda) and MINUTES (default 2) may be set to try the script on a CPU.
#
# It runs the source tree (PYTHONPATH=src) with the machine's own torch, so it needs no install;
# the python packages it needs beyond torch: numpy, sacrebleu, sentencepiece, safetensors, yaml.
set -euo pipefail
cd "$(dirname "$0")/.."
data="$(cd "${1:-${DATA_DIR:-../shared/data/multi30k}}" && pwd)"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
work="$(mktemp -d)"
trap 'rm -rf -- "$work"' EXIT
python3 - <<'PY'
import torch
if torch.cuda.is_available():
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, "
          f"bf16 supported: {torch.cuda.is_bf16_supported()}")
else:
    print(f"torch {torch.__version__}, no CUDA device")
PY
echo "== the CUDA tests"
# only the files with CUDA tests: the others import the server and browser extras
python3 -m pytest -q -rs -p no:cacheprovider -m gpu $(grep -l "mark.gpu" tests/test_*.py)
for precision in fp32 bf16; do
  model="$work/$precision"
  echo "== train 2 minutes, $precision"
  python3 -m seq2seq train --config configs/multi30k_en_de.yaml --data-dir "$data" \
    --model-dir "$model" --max-minutes "${MINUTES:-2}" --set train.device="${DEVICE:-cuda}" --set train.precision="$precision" \
    2>&1 | grep -E -i "device|kernels|paths|policy|step .*sentences|sentences/s|tokens/s|bleu|stopped|done" | tail -n 12
  for beam in 1 5; do
    echo "== test2016, $precision, beam $beam"
    python3 -m seq2seq evaluate --model-dir "$model" --device "${DEVICE:-cuda}" --beam "$beam" \
      --src "$data/test_2016_flickr.en.gz" --ref "$data/test_2016_flickr.de.gz"
  done
done
