#!/usr/bin/env bash
# The device check: nbl-onnx end to end on an NVIDIA GPU, in a few minutes, written to bench/gpu.json
# and to the table of docs/results/gpu.md named after that file (python3 -m nblbench.gpu).
#
#   scripts/gpu-check.sh [MODEL_DIR[:K] ...]
#
# For each model (default: the fixture llama-genai-fp16-cuda, K = 1):
#   1. calibrate on CUDA, timed, beside the model's own prefill speed on $ep (calibration throughput
#      relative to plain inference);
#   2. rewrite K layers (the statistics come from the CUDA run);
#   3. check the rewrite against the original on CUDA, then on TensorRT (without TensorRT's libraries
#      that is a clear error, recorded as such);
#   4. bench original and rewrite side by side on CUDA.
#
# Environment: NBL (the binary; default target/release/nbl-onnx where it exists, else a release build
# as scripts/lib.sh's nbl_binary makes it), ORT_DYLIB_PATH (an onnxruntime-gpu libonnxruntime.so;
# default: scripts/setup-ort.sh --gpu), SAMPLES and SEQ_LEN (calibration sequences; default 16 x 512),
# PROMPT_LEN and GEN (bench; default 512, 128), GPU_JSON (default bench/gpu.json; a file outside bench/
# leaves docs/results/gpu.md alone), WORK (a folder to keep the intermediate files in; default a
# temporary one, removed), and EP (default cuda; EP=cpu runs the same steps on the CPU, to try the
# script without a GPU: give it a GPU_JSON outside bench/).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$NBL_REPO"

out=${GPU_JSON:-bench/gpu.json}
samples=${SAMPLES:-16}
seq_len=${SEQ_LEN:-512}
prompt_len=${PROMPT_LEN:-512}
gen=${GEN:-128}
ep=${EP:-cuda}
models=("$@")
[[ ${#models[@]} -gt 0 ]] || models=(fixtures/llama-genai-fp16-cuda:1)

if [[ $ep == cpu ]]; then ensure_ort; else ensure_ort --gpu; fi
use_nblbench
if [[ -z "${NBL:-}" && -x target/release/nbl-onnx ]]; then
  NBL=target/release/nbl-onnx
fi
nbl=$(nbl_binary)
if [[ $ep == cpu ]]; then
  gpu="none (EP=cpu)"
else
  command -v nvidia-smi >/dev/null || die "nvidia-smi not found: this script needs an NVIDIA GPU (EP=cpu tries it without one)"
  gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -n 1)
fi

if [[ -n "${WORK:-}" ]]; then
  work=$WORK  # kept: statistics, reports and rewritten models, for a closer look
  mkdir -p "$work"
else
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
fi
mkdir -p "$(dirname "$out")"
echo "==> $gpu"

now() { date +%s.%N; }
results=()
for spec in "${models[@]}"; do
  dir=${spec%%:*}
  k=1
  [[ $spec == *:* ]] && k=${spec##*:}
  name=$(basename "$dir")
  w="$work/$name"
  mkdir -p "$w"
  for moments in host graph; do
    echo "==> $name: calibrate on $ep ($samples x $seq_len tokens, moments: $moments)"
    "$nbl" calibrate "$dir/model.onnx" --ep "$ep" --samples "$samples" --seq-len "$seq_len" --moments "$moments" \
      -o "$w/stats-$moments.nblstats" 2> >(tee "$w/calibrate-$moments.log" >&2)
    "$nbl" analyze "$w/stats-$moments.nblstats" --json > "$w/analyze-$moments.json"
  done
  cp "$w/stats-graph.nblstats" "$w/stats.nblstats"
  echo "==> $name: rewrite k = $k"
  "$nbl" rewrite "$dir/model.onnx" --stats "$w/stats.nblstats" --layers "$k" -o "$w/nbl/model.onnx" \
    --report "$w/rewrite.json"
  echo "==> $name: check on $ep"
  "$nbl" check "$w/nbl/model.onnx" --reference "$dir/model.onnx" --ep "$ep" --json > "$w/check.json"
  : > "$w/check-tensorrt.err"
  if [[ $ep == cuda ]]; then
    echo "==> $name: check on TensorRT"
    if "$nbl" check "$w/nbl/model.onnx" --reference "$dir/model.onnx" --ep tensorrt --json \
      > "$w/check-tensorrt.json" 2> "$w/check-tensorrt.err"; then
      echo "TensorRT: ran"
    else
      echo "TensorRT: $(tail -n 1 "$w/check-tensorrt.err")"
    fi
  fi
  echo "==> $name: bench on $ep (prompt $prompt_len, $gen new tokens)"
  "$nbl" bench "$dir/model.onnx" "$w/nbl/model.onnx" --ep "$ep" --prompt-len "$prompt_len" --gen "$gen" --json \
    > "$w/bench.json"
  python3 -m nblbench.gpu model "$w" "$name" "$k" "$samples" "$seq_len" > "$w/result.json"
  results+=("$w/result.json")
done

python3 -m nblbench.gpu combine "$out" "$gpu" "$ep" "${results[@]}"
echo "==> wrote $out"
