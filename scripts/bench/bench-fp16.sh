#!/usr/bin/env bash
# NBL on the fp16 exports of SmolLM2-135M-Instruct, on the CPU: the ONNX Runtime GenAI builder's
# (`-p fp16 -e cpu`: f16 throughout, MultiHeadAttention) and Optimum's (`--dtype fp16`: f16 branches
# summed into an f32 residual stream). For each, calibrated on C4 documents 0-199:
#
#   1. inspect; calibrate (32 x 512 tokens); rewrite k = 8 (cosine ranking) with `--weight-format
#      auto`, which stores W in f16;
#   2. check the rewrite against the original (a KV-cache decode on ONNX Runtime and tract);
#   3. eval original and rewrite on 32 sequences of C4 documents 200-299 (perplexity, KL, top-1, greedy
#      continuations);
#   4. bench both in one run.
#
# Writes bench/fp16.json and the table of docs/results/fp16.md (python3 -m nblbench.fp16).
#
#   scripts/bench/bench-fp16.sh [--runs N]
#
# Needs models/smollm2-genai-fp16 and models/smollm2-optimum-fp16 (scripts/models/prepare-smollm2.sh);
# builds nbl-onnx and installs ONNX Runtime (scripts/setup-ort.sh) if missing. About 10 minutes on 2 cores.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
cd "$NBL_REPO"

runs=3
while [[ $# -gt 0 ]]; do
  case $1 in
    --runs) runs=$2; shift 2 ;;
    *) echo "usage: $0 [--runs N]" >&2; exit 2 ;;
  esac
done

exports=(smollm2-genai-fp16 smollm2-optimum-fp16)
for name in "${exports[@]}"; do
  need_model "models/$name"
done
use_nblbench
ensure_ort
nbl=$(nbl_binary)
work=bench/tmp/fp16
rm -rf "$work"
mkdir -p "$work"
seq_len=512 k=8

for name in "${exports[@]}"; do
  model=models/$name/model.onnx
  w=$work/$name
  mkdir -p "$w"
  echo "==> $name: inspect; calibrate (C4 documents 0-199, 32 x $seq_len tokens)"
  "$nbl" inspect "$model" --json > "$w/inspect.json"
  "$nbl" calibrate "$model" --seq-len "$seq_len" --samples 32 -o "$w/stats.safetensors" 2> "$w/calibrate.log"
  echo "==> $name: rewrite k = $k (cosine ranking, W as the model stores it); check"
  "$nbl" rewrite "$model" --stats "$w/stats.safetensors" --layers "$k" --criterion cosine \
    -o "$w/k$k/model.onnx" --report "$w/rewrite.json" > /dev/null
  # The original's own check is recorded too: the GenAI export as written does not decode on ONNX
  # Runtime's CPU provider (see docs/results/fp16.md), which is what the rewrite's missing annotations fix.
  "$nbl" check "$model" --json > "$w/check-original.json" 2> /dev/null || true
  "$nbl" check "$w/k$k/model.onnx" --reference "$model" --json > "$w/check.json"
  echo "==> $name: eval on C4 documents 200-299"
  "$nbl" eval "$model" "$w/k$k/model.onnx" --seq-len "$seq_len" --samples 32 --json > "$w/eval.json"
  echo "==> $name: bench, $runs runs"
  "$nbl" bench "$model" "$w/k$k/model.onnx" --runs "$runs" --json > "$w/bench.json"
done

python3 -m nblbench.fp16 "$work" "${exports[@]}"
