#!/usr/bin/env bash
# The end-to-end benchmark on a real model: SmolLM2-135M-Instruct (Optimum export), calibrated on
# C4 documents 0-199 and evaluated on documents 200-299 (../shared/data/c4_demo.json), for
# k = 0, 4, 8, 12 replaced attention layers with NBL (--criterion cca), NBL ranked by cosine, and
# attention dropping (--replace drop, ranked by cosine as LLM-Drop does).
# Writes bench/results.json, bench/results.md (the README's table) and bench/results.svg.
#
#   scripts/bench-smollm2.sh [--ep cpu|cuda|tensorrt] [--runs N]
#
# Needs models/smollm2-optimum (scripts/prepare-smollm2.sh makes it) and ONNX Runtime
# (scripts/setup-ort.sh). Takes about half an hour on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."

ep=cpu runs=3 seq_len=512 prompt_len=512 gen=128
while [[ $# -gt 0 ]]; do
  case $1 in
    --ep) ep=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    *) echo "usage: $0 [--ep cpu|cuda|tensorrt] [--runs N]" >&2; exit 2 ;;
  esac
done

data=../shared/data/c4_demo.json
model=models/smollm2-optimum/model.onnx
[[ -f $data ]] || { echo "error: $data not found" >&2; exit 2; }
[[ -f $model ]] || { echo "error: $model not found: run scripts/prepare-smollm2.sh" >&2; exit 2; }
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/nbl-onnx/target}"
echo "==> building nbl-onnx (release)"
cargo build --release --locked --quiet
nbl="$CARGO_TARGET_DIR/release/nbl-onnx"
work=bench/tmp
mkdir -p "$work"

echo "==> splitting $data: documents 0-199 calibrate, 200-299 evaluate"
python3 - "$data" "$work" <<'PY'
import json, sys
docs = json.load(open(sys.argv[1]))
json.dump(docs[:200], open(f"{sys.argv[2]}/calibration.json", "w"))
json.dump(docs[200:300], open(f"{sys.argv[2]}/evaluation.json", "w"))
PY

echo "==> calibrating (seq-len $seq_len)"
"$nbl" calibrate "$model" --data "$work/calibration.json" --seq-len "$seq_len" --samples 256 --ep "$ep" \
  -o "$work/stats.safetensors" 2> >(tee "$work/calibrate.log" >&2)

models=("$model")
labels=("original")
for method in cca cosine drop; do
  for k in 4 8 12; do
    out="$work/$method-k$k/model.onnx"
    mkdir -p "$(dirname "$out")"
    case $method in
      cca) flags=(--criterion cca) ;;
      cosine) flags=(--criterion cosine) ;;
      drop) flags=(--criterion cosine --replace drop) ;;
    esac
    echo "==> rewrite: $method, k=$k"
    "$nbl" rewrite "$model" --stats "$work/stats.safetensors" --layers "$k" "${flags[@]}" -o "$out" \
      --report "$work/$method-k$k/report.json"
    models+=("$out")
    labels+=("$method-k$k")
  done
done

echo "==> plain inference throughput of the original (for calibration's share of it)"
"$nbl" eval "$model" --data "$work/calibration.json" --seq-len "$seq_len" --samples 32 --engine ort --ep "$ep" \
  --json > "$work/inference.json"

echo "==> evaluating ${#models[@]} models (perplexity, KL, top-1)"
"$nbl" eval "${models[@]}" --data "$work/evaluation.json" --seq-len "$seq_len" --engine ort --ep "$ep" \
  --json > "$work/eval.json"

echo "==> timing ${#models[@]} models (prefill $prompt_len, decode $gen, $runs runs)"
"$nbl" bench "${models[@]}" --prompt-len "$prompt_len" --gen "$gen" --runs "$runs" --ep "$ep" --json \
  > "$work/bench.json"

echo "==> writing bench/results.{json,md,svg}"
python3 scripts/bench_report.py "$work" "${labels[@]}"
