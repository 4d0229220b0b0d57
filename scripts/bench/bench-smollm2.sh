#!/usr/bin/env bash
# The end-to-end benchmark on a real model: SmolLM2-135M-Instruct (Optimum export), calibrated on
# C4 documents 0-199 and evaluated on documents 200-299 (the built-in sample, data/c4_demo.json.gz), for
# k = 0, 4, 8, 12 replaced attention layers with NBL (--criterion cca), NBL ranked by cosine, and
# attention dropping (--replace drop, ranked by cosine as LLM-Drop does). The ONNX Runtime GenAI export
# of the same model is calibrated on the same data (its layer ranking must match the Optimum one's)
# and its NBL rewrites are timed too: its attention is one fused GroupQueryAttention node, so its
# speed-ups show what the multiply-add count predicts without the decomposed graph's overheads.
# Writes bench/results.json, docs/results/smollm2.svg and the table of docs/results/smollm2.md
# (python3 -m nblbench.smollm2), then runs scripts/bench/bench-selection.sh, and on the CPU
# scripts/bench/bench-fp16.sh and scripts/bench/bench-int4.sh where their exports exist.
#
#   scripts/bench/bench-smollm2.sh [--ep cpu|cuda|tensorrt] [--runs N]
#
# Needs models/smollm2-{optimum,genai} (scripts/models/prepare-smollm2.sh makes them); builds nbl-onnx
# and installs ONNX Runtime (scripts/setup-ort.sh) if missing. Takes about 45 minutes on 2 CPU cores.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
cd "$NBL_REPO"

ep=cpu runs=3 seq_len=512 prompt_len=512 gen=128
while [[ $# -gt 0 ]]; do
  case $1 in
    --ep) ep=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    *) echo "usage: $0 [--ep cpu|cuda|tensorrt] [--runs N]" >&2; exit 2 ;;
  esac
done

model=models/smollm2-optimum/model.onnx
genai=models/smollm2-genai/model.onnx
need_model "$(dirname "$model")"
need_model "$(dirname "$genai")"
use_nblbench
if [[ $ep == cpu ]]; then ensure_ort; else ensure_ort --gpu; fi
nbl=$(nbl_binary)
work=bench/tmp
mkdir -p "$work"

echo "==> splitting the C4 sample: documents 0-199 calibrate, 200-299 evaluate"
python3 -m nblbench.corpus "$work" > /dev/null

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
  ids=$(python3 -m nblbench.layers ranked "$work/analysis-optimum.json" --skip 0 --take "$k")
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

echo "==> writing bench/results.json, docs/results/smollm2.{md,svg}"
python3 -m nblbench.smollm2 "$work"

echo "==> choosing and fitting layers: scripts/bench/bench-selection.sh"
NBL="$nbl" scripts/bench/bench-selection.sh

# The deployed formats, where their exports exist (the GenAI int4 one needs onnxruntime-genai too,
# which bench-int4.sh installs).
if [[ $ep == cpu && -f models/smollm2-genai-fp16/model.onnx && -f models/smollm2-optimum-fp16/model.onnx ]]; then
  echo "==> fp16 exports: scripts/bench/bench-fp16.sh"
  NBL="$nbl" scripts/bench/bench-fp16.sh --runs "$runs"
fi
if [[ $ep == cpu && -f models/smollm2-genai-int4/model.onnx ]]; then
  echo "==> int4 export: scripts/bench/bench-int4.sh"
  NBL="$nbl" scripts/bench/bench-int4.sh --runs "$runs"
fi
