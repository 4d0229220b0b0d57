#!/usr/bin/env bash
# Decode and prefill at long contexts on SmolLM2-135M-Instruct (the Optimum export, context 8192), on
# the CPU: the paper's NBL at k = 4, 8 and 12 (CCA order, attention calibrated on C4 documents 0-199),
# each timed against the original in a bench run of its own per prompt length (512, 2048, 4096, 8192;
# 128 tokens generated, alternating runs, medians), beside the speed-ups the multiply-adds and the bytes read
# predict at each length. Writes bench/long-context.json, the table of docs/results/long-context.md and
# docs/results/long-context.svg (python3 -m nblbench.long_context).
#
#   scripts/bench/bench-long-context.sh [--runs N] [--lengths "512 2048"]   # about 15 minutes on 2 cores
#
# Reuses bench/tmp/frontier/attention.safetensors where bench-frontier.sh left it. Needs
# models/smollm2-optimum (scripts/models/prepare-smollm2.sh); builds nbl-onnx and installs ONNX Runtime
# (scripts/setup-ort.sh) where missing.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
cd "$NBL_REPO"
runs=3 lengths="512 2048 4096 8192" gen=128
while (($#)); do
  case $1 in
    --runs) runs=$2; shift 2 ;;
    --lengths) lengths=$2; shift 2 ;;
    *) die "unknown argument $1" ;;
  esac
done
model=models/smollm2-optimum/model.onnx
need_model "$(dirname "$model")"
use_nblbench
ensure_ort
nbl=$(nbl_binary)
work=bench/tmp/long-context
mkdir -p "$work"
stats=bench/tmp/frontier/attention.safetensors
if [[ ! -f $stats ]]; then
  stats=$work/attention.safetensors
  echo "==> calibrating the attention sites on 64 sequences of 512 tokens"
  "$nbl" calibrate "$model" --seq-len 512 --samples 64 -o "$stats" 2> "$work/calibrate.log"
fi
models=("$model")
for k in 4 8 12; do
  out=$work/k$k/model.onnx
  echo "==> rewrite k=$k (CCA order)"
  "$nbl" rewrite "$model" --stats "$stats" --layers "$k" -o "$out" --report "$work/k$k/report.json" 2> /dev/null
  models+=("$out")
done
# One process per rewrite, beside the original: four fp32 sessions of the Optimum export at 4096 tokens
# hold ONNX Runtime's decomposed-attention score buffers and fill 24 GB.
for len in $lengths; do
  for k in 4 8 12; do
    echo "==> bench at prompt $len: the original and k=$k, $gen tokens generated, $runs runs"
    "$nbl" bench "$model" "$work/k$k/model.onnx" --prompt-len "$len" --gen "$gen" --runs "$runs" --json \
      > "$work/bench-$len-k$k.json"
  done
done
python3 -m nblbench.long_context "$work"
