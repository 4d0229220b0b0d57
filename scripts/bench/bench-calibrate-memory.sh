#!/usr/bin/env bash
# Peak memory of `nbl-onnx calibrate` against the number of calibration tokens: two runs over 1x
# and 4x the sequences. Statistics are O(layers x d^2) and activations are never kept, so the peak
# should not grow with the tokens. Writes bench/calibrate-memory.json and a table of
# docs/results/scale.md (python3 -m nblbench.memory).
#
#   scripts/bench/bench-calibrate-memory.sh MODEL DATA [SAMPLES] [SEQ_LEN]
#   e.g. scripts/bench/bench-calibrate-memory.sh models/smollm2-optimum/model.onnx data.json 8 512
#
# Builds nbl-onnx, installs ONNX Runtime (scripts/setup-ort.sh) and GNU time if missing.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
[[ $# -ge 2 ]] || { echo "usage: $0 MODEL DATA [SAMPLES] [SEQ_LEN]" >&2; exit 2; }
cd "$NBL_REPO"  # MODEL and DATA are relative to the repository root
model=$1 data=$2 samples=${3:-8} seq_len=${4:-512}
[[ -f $model ]] || die "$model not found (models/smollm2-optimum: run scripts/models/prepare-smollm2.sh first)"
[[ -f $data ]] || die "$data not found (a .json, .jsonl or .txt data file, as calibrate --data takes)"
need_gnu_time
use_nblbench
ensure_ort
nbl=$(nbl_binary)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
runs=("$samples" $((samples * 4)))
for n in "${runs[@]}"; do
  echo "==> calibrate, $n sequences of $seq_len tokens"
  /usr/bin/time -f "%M %e" -o "$tmp/$n.time" "$nbl" calibrate "$model" --data "$data" --samples "$n" \
    --seq-len "$seq_len" -o "$tmp/stats.safetensors" 2> "$tmp/log"
  stat -c %s "$tmp/stats.safetensors" > "$tmp/$n.bytes"
  rm -f "$tmp/stats.safetensors"
done
python3 -m nblbench.memory "$tmp" "$model" "$seq_len" "${runs[@]}"
