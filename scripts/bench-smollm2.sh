#!/usr/bin/env bash
# The end-to-end benchmark on a real model: SmolLM2-135M-Instruct (Optimum export), calibrated on
# C4 documents 0-199 and evaluated on documents 200-299 (../shared/data/c4_demo.json), for
# k = 0, 4, 8, 12 replaced attention layers with NBL (--criterion cca), NBL ranked by cosine, and
# attention dropping (--replace drop, ranked by cosine as LLM-Drop does). The ONNX Runtime GenAI export
# of the same model is calibrated on the same data (its layer ranking must match the Optimum one's)
# and its NBL rewrites are timed too: its attention is one fused GroupQueryAttention node, so its
# speed-ups show what the multiply-add count predicts without the decomposed graph's overheads.
# Writes bench/results.json, bench/results.md (the README's table) and bench/results.svg, then runs
# scripts/bench-selection.sh, and on the CPU scripts/bench-fp16.sh and scripts/bench-int4.sh where
# their exports exist.
#
#   scripts/bench-smollm2.sh [--ep cpu|cuda|tensorrt] [--runs N]
#
# Needs models/smollm2-{optimum,genai} (scripts/prepare-smollm2.sh makes them) and ONNX Runtime
# (scripts/setup-ort.sh). Takes about 45 minutes on 2 CPU cores.
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
genai=models/smollm2-genai/model.onnx
[[ -f $data ]] || { echo "error: $data not found" >&2; exit 2; }
for m in "$model" "$genai"; do
  [[ -f $m ]] || { echo "error: $m not found: run scripts/prepare-smollm2.sh" >&2; exit 2; }
done
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

echo "==> calibrating the Optimum export (seq-len $seq_len)"
"$nbl" calibrate "$model" --data "$work/calibration.json" --seq-len "$seq_len" --samples 256 --ep "$ep" \
  -o "$work/stats.safetensors" 2> >(tee "$work/calibrate.log" >&2)
echo "==> calibrating the GenAI export on the same data"
"$nbl" calibrate "$genai" --data "$work/calibration.json" --seq-len "$seq_len" --samples 256 --ep "$ep" \
  -o "$work/stats-genai.safetensors" 2> >(tee "$work/calibrate-genai.log" >&2)
"$nbl" analyze "$work/stats.safetensors" --json > "$work/analysis-optimum.json"
"$nbl" analyze "$work/stats-genai.safetensors" --json > "$work/analysis-genai.json"

# One line per model: label, export, method, k, path. The report reads it back.
manifest="$work/models.tsv"
printf 'original\toptimum\toriginal\t0\t%s\n' "$model" > "$manifest"
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
    printf '%s\toptimum\t%s\t%s\t%s\n' "$method-k$k" "$method" "$k" "$out" >> "$manifest"
  done
done
# NBL by the CCA ranking with layer 0 kept: layer 0's attention reads the raw token embeddings, and
# its bound (scale-free) does not see how large its error is next to that small stream.
for k in 4 8 12; do
  out="$work/cca-keep0-k$k/model.onnx"
  mkdir -p "$(dirname "$out")"
  ids=$(python3 -c 'import json, sys; o = json.load(open(sys.argv[1]))["order"]; print(",".join(map(str, [l for l in o if l != 0][: int(sys.argv[2])])))' \
    "$work/analysis-optimum.json" "$k")
  echo "==> rewrite: cca with layer 0 kept, k=$k (layers $ids)"
  "$nbl" rewrite "$model" --stats "$work/stats.safetensors" --layer-ids "$ids" -o "$out" \
    --report "$work/cca-keep0-k$k/report.json"
  printf 'cca-keep0-k%s\toptimum\tcca-keep0\t%s\t%s\n' "$k" "$k" "$out" >> "$manifest"
done
printf 'genai-original\tgenai\toriginal\t0\t%s\n' "$genai" >> "$manifest"
for k in 4 8 12; do
  out="$work/genai-cca-k$k/model.onnx"
  rm -rf "$(dirname "$out")" && mkdir -p "$(dirname "$out")"
  echo "==> rewrite (GenAI export): cca, k=$k"
  "$nbl" rewrite "$genai" --stats "$work/stats-genai.safetensors" --layers "$k" -o "$out" \
    --report "$work/genai-cca-k$k/report.json"
  printf 'genai-cca-k%s\tgenai\tcca\t%s\t%s\n' "$k" "$k" "$out" >> "$manifest"
done
mapfile -t models < <(cut -f5 "$manifest")
mapfile -t optimum_models < <(awk -F'\t' '$2 == "optimum" { print $5 }' "$manifest")

echo "==> plain inference throughput of the original (for calibration's share of it)"
"$nbl" eval "$model" --data "$work/calibration.json" --seq-len "$seq_len" --samples 32 --engine ort --ep "$ep" \
  --json > "$work/inference.json"

echo "==> evaluating ${#optimum_models[@]} models (perplexity, KL, top-1)"
"$nbl" eval "${optimum_models[@]}" --data "$work/evaluation.json" --seq-len "$seq_len" --engine ort --ep "$ep" \
  --json > "$work/eval.json"

echo "==> timing ${#models[@]} models (prefill $prompt_len, decode $gen, $runs runs)"
"$nbl" bench "${models[@]}" --prompt-len "$prompt_len" --gen "$gen" --runs "$runs" --ep "$ep" --json \
  > "$work/bench.json"

echo "==> writing bench/results.{json,md,svg}"
python3 scripts/bench_report.py "$work"

echo "==> choosing and fitting layers: scripts/bench-selection.sh"
scripts/bench-selection.sh

# The deployed formats, where their exports exist (the GenAI int4 one needs onnxruntime-genai too).
if [[ $ep == cpu && -f models/smollm2-genai-fp16/model.onnx && -f models/smollm2-optimum-fp16/model.onnx ]]; then
  echo "==> fp16 exports: scripts/bench-fp16.sh"
  scripts/bench-fp16.sh --runs "$runs"
fi
ort_python="${NBL_ORT_DIR:-$HOME/.cache/nbl-onnx/onnxruntime}/cpu/venv/bin/python"
if [[ $ep == cpu && -f models/smollm2-genai-int4/model.onnx ]] && "$ort_python" -c "import onnxruntime_genai" 2>/dev/null; then
  echo "==> int4 export: scripts/bench-int4.sh"
  scripts/bench-int4.sh --runs "$runs"
fi
