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
#
#   scripts/gpu-check.sh --scale
#
# The 8B shape (Llama-3-8B: d = 4096, 32 layers, GQA 32/8, MLP 14336, vocabulary 128,256), random
# weights, fp16 and int4 as the GenAI builder exports them, in under 8 minutes on one H100/H200:
#   1. the models: shells of 3 builder layers (graph and small tensors, a few MB, no data file:
#      scripts/models/synthetic_weights.py shell) are made here once, where the builder is installed,
#      under SHELLS (default bench/tmp/gpu-scale/shells; carry it to the device). Where the check runs,
#      repeat_layers.py grows them to LAYERS (default 32; repeated layers share their bytes) and
#      synthetic_weights.py fill draws the weights;
#   2. calibrate SAMPLES x SEQ_LEN tokens (default 2 x 256) with in-graph statistics, each batch's
#      products in f32 and then in f64, timed once the session is built;
#   3. rewrite at each of KS (default "8 12") layers, from the f32 statistics;
#   4. bench the original and the rewrites side by side at each of PREFILL_LENS (default "512 2048")
#      prompt tokens; the run at DECODE_CONTEXT (default 2048) generates GEN tokens (default 128), the
#      others 8; RUNS timed runs each (default 3).
# Writes GPU_JSON (default bench/gpu-scale.json) and, for a file in bench/, the block gpu-scale of
# docs/results/gpu.md (python3 -m nblbench.gpu_scale). PRECISIONS (default "fp16 int4") picks the models.
# EP=cpu runs every step on the CPU: with LAYERS=2 KS=1 PREFILL_LENS="32 64" DECODE_CONTEXT=64 GEN=8
# RUNS=1 and a GPU_JSON outside bench/ it is the script's own test on a 2-layer slice of the shape.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$NBL_REPO"

# device_setup EP OUT: ONNX Runtime for EP, the nbl-onnx binary ($nbl), the device's name ($gpu), the
# work folder ($work: $WORK, kept, else a temporary one removed on exit) and OUT's folder.
device_setup() {
  local ep=$1 out=$2
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
}

scale_check() {
  local layers=${LAYERS:-32} samples=${SAMPLES:-2} seq_len=${SEQ_LEN:-256} gen=${GEN:-128} runs=${RUNS:-3}
  local decode_context=${DECODE_CONTEXT:-2048} shells=${SHELLS:-bench/tmp/gpu-scale/shells}
  local out=${GPU_JSON:-bench/gpu-scale.json} ep=${EP:-cuda}
  local -a ks=(${KS:-8 12}) precisions=(${PRECISIONS:-fp16 int4}) prefill_lens=(${PREFILL_LENS:-512 2048})
  [[ " ${prefill_lens[*]} " == *" $decode_context "* ]] \
    || die "DECODE_CONTEXT=$decode_context is not one of PREFILL_LENS (${prefill_lens[*]}): decoding is timed in that bench run"
  local provider=cuda
  [[ $ep == cpu ]] && provider=cpu
  # A shell of 3 builder layers grows to any depth; a shallower model is built at its own depth.
  local shell_layers=3
  ((layers < 3)) && shell_layers=$layers

  device_setup "$ep" "$out"
  local onnx_python
  onnx_python=$(python_with onnx numpy) || die "no Python with onnx and numpy found (set PYTHON)"
  echo "==> $gpu; the 8B shape at $layers layers: ${precisions[*]}"

  local results=() p shell w k len new_tokens models
  for p in "${precisions[@]}"; do
    shell=$shells/llama-3-8b-$p-$provider-$shell_layers
    if [[ ! -f $shell/model.onnx ]]; then
      echo "==> $p: no shell at $shell; building one with the GenAI builder (here, once)"
      local built=$shell.built
      rm -rf "$built"
      mkdir -p "$(dirname "$shell")"
      "$(genai_python)" scripts/models/make_synthetic.py --shape llama-3-8b --layers "$shell_layers" \
        --precision "$p" --provider "$provider" --out "$built" > "$shell.log" 2>&1 \
        || die "scripts/models/make_synthetic.py failed: see $shell.log"
      "$onnx_python" scripts/models/synthetic_weights.py shell "$built" "$shell"
      rm -rf "$built"
    fi
    w=$work/$p
    rm -rf "$w"
    mkdir -p "$w"
    echo "==> $p: the model, $layers layers, weights drawn here"
    if ((layers > shell_layers)); then
      "$onnx_python" scripts/models/repeat_layers.py "$shell" "$w/model" --layers "$layers"
    else
      cp -r "$shell" "$w/model"
    fi
    "$onnx_python" scripts/models/synthetic_weights.py fill "$w/model"
    for precision in f32 f64; do
      echo "==> $p: calibrate on $ep ($samples x $seq_len tokens, in-graph moments, products in $precision)"
      "$nbl" calibrate "$w/model/model.onnx" --ep "$ep" --samples "$samples" --seq-len "$seq_len" --moments graph \
        --moment-precision "$precision" -o "$w/stats-$precision.nblstats" 2> >(tee "$w/calibrate-$precision.log" >&2)
      "$nbl" analyze "$w/stats-$precision.nblstats" --json > "$w/analyze-$precision.json"
    done
    models=("$w/model/model.onnx")
    for k in "${ks[@]}"; do
      echo "==> $p: rewrite k = $k"
      "$nbl" rewrite "$w/model/model.onnx" --stats "$w/stats-f32.nblstats" --layers "$k" -o "$w/nbl-$k/model.onnx" \
        --report "$w/rewrite-$k.json"
      models+=("$w/nbl-$k/model.onnx")
    done
    for len in "${prefill_lens[@]}"; do
      new_tokens=8
      [[ $len == "$decode_context" ]] && new_tokens=$gen
      echo "==> $p: bench on $ep (prompt $len, $new_tokens new tokens)"
      "$nbl" bench "${models[@]}" --ep "$ep" --prompt-len "$len" --gen "$new_tokens" --runs "$runs" --json \
        > "$w/bench-$len.json"
    done
    python3 -m nblbench.gpu_scale model "$w" "$p" "$layers" "$decode_context" > "$w/result.json"
    results+=("$w/result.json")
    rm -rf "$w/model" "$w"/nbl-*  # the next precision's weights need the disk
  done
  python3 -m nblbench.gpu_scale combine "$out" "$gpu" "$ep" "${results[@]}"
  echo "==> wrote $out"
}

if [[ ${1:-} == --scale ]]; then
  scale_check
  exit 0
fi

out=${GPU_JSON:-bench/gpu.json}
samples=${SAMPLES:-16}
seq_len=${SEQ_LEN:-512}
prompt_len=${PROMPT_LEN:-512}
gen=${GEN:-128}
ep=${EP:-cuda}
models=("$@")
[[ ${#models[@]} -gt 0 ]] || models=(fixtures/llama-genai-fp16-cuda:1)

device_setup "$ep" "$out"
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
