#!/usr/bin/env bash
# NBL on the int4 format people deploy on CPUs: SmolLM2-135M-Instruct as the ONNX Runtime GenAI builder
# exports it by default (`-p int4 -e cpu`: int4 MatMulNBits, the token embedding a GatherBlockQuantized
# tied to the int4 LM head), calibrated on C4 documents 0-199 and evaluated on 200-299.
#
#   1. inspect; calibrate; rewrite k = 4, 8, 12 with int4 W (GPTQ, the model's own group size);
#      check each against the original; generate 20 tokens with onnxruntime-genai from each directory;
#   2. bench the original and k = 4, 8, 12 in one run, with sizes on disk;
#   3. quality at k = 8 on held-out text: W as f32, int4 GPTQ and int4 round-to-nearest;
#   4. a 4-layer slice of Llama-3-8B's shape (random weights, GenAI int4): the original, 2 of 4 layers
#      with int4 W and with f32 W, in one bench run.
#
# Writes bench/int4.json and the tables of docs/results/int4.md (python3 -m nblbench.int4).
#
#   scripts/bench/bench-int4.sh [--runs N] [--skip-slice]
#
# Needs models/smollm2-genai-int4 (scripts/models/prepare-smollm2.sh). Installs what else is missing:
# ONNX Runtime with onnxruntime-genai (scripts/setup-ort.sh --with-genai), nbl-onnx (cargo build), and
# for the slice the GenAI builder's virtualenv (NBL_GENAI_VENV, default $HOME/.cache/nbl-onnx/py/genai,
# the one prepare-smollm2.sh made; several GB when it must be created). About 25 minutes on 2 cores.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
cd "$NBL_REPO"

runs=3 slice=1
while [[ $# -gt 0 ]]; do
  case $1 in
    --runs) runs=$2; shift 2 ;;
    --skip-slice) slice=0; shift ;;
    *) echo "usage: $0 [--runs N] [--skip-slice]" >&2; exit 2 ;;
  esac
done

model_dir=models/smollm2-genai-int4
need_model "$model_dir"
use_nblbench
ort_python=$(ort_genai_python)
if ((slice)); then
  builder_python=$(genai_python)
fi
nbl=$(nbl_binary)
work=bench/tmp/int4
rm -rf "$work"
mkdir -p "$work"
seq_len=512

echo "==> inspect"
"$nbl" inspect "$model_dir/model.onnx" --json > "$work/inspect.json"
echo "==> calibrate (C4 documents 0-199, 128 x $seq_len tokens)"
"$nbl" calibrate "$model_dir/model.onnx" --seq-len "$seq_len" --samples 128 -o "$work/stats.safetensors"

rewrite() { # rewrite NAME K [rewrite options...]: a GenAI directory of its own
  local name=$1 k=$2
  shift 2
  "$nbl" rewrite "$model_dir/model.onnx" --stats "$work/stats.safetensors" --layers "$k" \
    -o "$work/$name/model.onnx" --report "$work/$name.report.json" "$@" > /dev/null
}
for k in 4 8 12; do
  echo "==> rewrite k = $k (int4 W, GPTQ); check; onnxruntime-genai generates 20 tokens"
  rewrite "k$k" "$k"
  "$nbl" check "$work/k$k/model.onnx" --reference "$model_dir/model.onnx" --json > "$work/k$k.check.json"
  "$ort_python" scripts/genai_generate.py "$work/k$k" --prompt 504,3458,282,4649,314 --tokens 20 \
    > "$work/k$k.genai.json"
done
echo "==> rewrite k = 8 with f32 W and with round-to-nearest int4 W"
rewrite k8-f32 8 --weight-format f32
rewrite k8-rtn 8 --quantizer rtn

echo "==> bench: original, k = 4, 8, 12 (int4 W), $runs runs"
"$nbl" bench "$model_dir/model.onnx" "$work"/k{4,8,12}/model.onnx --runs "$runs" --json > "$work/bench.json"
echo "==> eval on C4 documents 200-299: original, k = 8 with f32, GPTQ int4 and RTN int4 W"
"$nbl" eval "$model_dir/model.onnx" "$work"/k8-f32/model.onnx "$work"/k8/model.onnx "$work"/k8-rtn/model.onnx \
  --seq-len "$seq_len" --json > "$work/eval.json"

if ((slice)); then
  slice_dir=$work/llama3-8b-slice
  echo "==> a 4-layer slice of Llama-3-8B's shape, GenAI int4 (random weights)"
  run_nice "$builder_python" scripts/models/make_synthetic.py --shape llama-3-8b --layers 4 --precision int4 \
    --provider cpu --out "$slice_dir" > "$work/slice-build.log" 2>&1 \
    || die "scripts/models/make_synthetic.py failed: see $work/slice-build.log"
  "$nbl" calibrate "$slice_dir/model.onnx" --seq-len 256 --samples 16 -o "$work/slice.safetensors"
  for format in auto f32; do
    "$nbl" rewrite "$slice_dir/model.onnx" --stats "$work/slice.safetensors" --layers 2 \
      --weight-format "$format" -o "$work/slice-$format/model.onnx" --report "$work/slice-$format.report.json" \
      > /dev/null
  done
  "$nbl" bench "$slice_dir/model.onnx" "$work"/slice-{auto,f32}/model.onnx --prompt-len 128 --gen 32 \
    --runs "$runs" --json > "$work/slice-bench.json"
fi

if ((slice)); then
  python3 -m nblbench.int4 "$work" "$model_dir"
else
  python3 -m nblbench.int4 "$work" "$model_dir" --no-slice
fi
