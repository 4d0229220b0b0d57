#!/usr/bin/env bash
# Statistics and rewriting at the scale of an 8B model (Llama-3-8B's shapes: d = 4096, 32 layers,
# 32 query / 8 KV heads of 128, MLP 14336, GenAI int4 export with random weights):
#   1. the model: a 3-layer GenAI export (scripts/models/make_synthetic.py; reused from bench-int4.sh's
#      4-layer slice when that exists) grown to 32 layers by scripts/models/repeat_layers.py, which repeats
#      a middle layer and points its weights at the same bytes (the data file is hard-linked);
#   2. a full-size statistics file for it, written without calibrating (`nbl-onnx synthetic-stats
#      --model`: the model's fingerprint and layers, synthetic moments);
#   3. `analyze` of all 32 layers on 2 threads: wall time and peak RSS (layers are read from the file
#      and fitted one at a time, each fit parallel within);
#   4. the bound + LMMSE fit of one d = 4096 layer on 2 threads (`analyze` of a one-layer file);
#   5. `rewrite --layers 12` of the 32-layer model with its statistics (12 maps fitted again and
#      quantised by GPTQ to the model's int4, the 6.6 GB data file copied): wall time, peak RSS, and
#      the output's MB/s against a plain copy of the same output file, measured right after;
#   6. the file's size against the 3d² f64 per layer of format version 1;
#   7. calibration's peak RSS for 1 and 2 layers of the short export (--layer-range 0..1, 0..2; 2
#      sequences of 128 tokens, moments on the host), the difference being one layer's, extrapolated to 32.
# Writes bench/scale.json and the table of docs/results/scale.md (python3 -m nblbench.scale).
#
#   scripts/bench/bench-scale.sh        # about 15 minutes on 2 cores; 19 GB of disk under bench/tmp
#
# Installs what is missing: nbl-onnx (cargo build), ONNX Runtime (scripts/setup-ort.sh), GNU time, and a
# Python with onnx for repeat_layers.py (any virtualenv that has it, else the GenAI builder's, which the
# short export needs anyway when no slice exists: NBL_GENAI_VENV, see scripts/lib.sh).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
cd "$NBL_REPO"
need_gnu_time
use_nblbench
ensure_ort
nbl=$(nbl_binary)
work=bench/tmp/scale
mkdir -p "$work"
d=4096 layers=32 k=12
export RAYON_NUM_THREADS=2

slice=bench/tmp/int4/llama3-8b-slice
if [[ ! -f $slice/model.onnx ]]; then
  slice=$work/slice
  if [[ ! -f $slice/model.onnx ]]; then
    echo "==> a 3-layer GenAI int4 export of Llama-3-8B's shape (random weights)"
    builder_python=$(genai_python)
    run_nice "$builder_python" scripts/models/make_synthetic.py --shape llama-3-8b --layers 3 --precision int4 \
      --provider cpu --out "$slice" > "$work/slice-build.log" 2>&1 \
      || die "scripts/models/make_synthetic.py failed: see $work/slice-build.log"
  fi
fi
onnx_python=$(python_with onnx) || onnx_python=$(genai_python)

echo "==> grown to $layers layers"
rm -rf "$work/model" "$work/rewritten"
"$onnx_python" scripts/models/repeat_layers.py "$slice" "$work/model" --layers "$layers"
"$nbl" inspect "$work/model/model.onnx" --json > "$work/inspect.json"

echo "==> writing a $layers-layer statistics file at d = $d for it"
rm -f "$work/stats.safetensors" "$work/one.safetensors"
"$nbl" synthetic-stats "$work/stats.safetensors" --model "$work/model/model.onnx"
"$nbl" synthetic-stats "$work/one.safetensors" --hidden-size "$d" --layers 1

measure() { # measure NAME ARGS...: wall seconds and peak RSS (KiB) of nbl-onnx ARGS
  local name=$1
  shift
  /usr/bin/time -f "%e %M" -o "$work/$name.time" "$nbl" "$@" > "$work/$name.out"
}
echo "==> analyze, $layers layers, 2 threads"
measure analyze analyze "$work/stats.safetensors" --json --chart "$work/stats.svg"
echo "==> analyze, 1 layer, 2 threads"
measure one analyze "$work/one.safetensors" --json --chart "$work/one.svg"
echo "==> rewrite, $k of $layers layers, 2 threads"
sync
measure rewrite rewrite "$work/model/model.onnx" --stats "$work/stats.safetensors" --layers "$k" \
  -o "$work/rewritten/model.onnx" --report "$work/rewrite.report.json"
# Neither the rewrite nor the copy waits for the disk (no fsync); each starts with nothing dirty.
sync
copy_s=$(python3 -m nblbench.scale copy-seconds "$work/rewritten/model.onnx.data" "$work/copy.data")
rm -f "$work/copy.data"

for range in 0..1 0..2; do
  echo "==> calibrate layers $range of the short export, 2 threads"
  measure "calibrate-$range" calibrate "$slice/model.onnx" --layer-range "$range" --seq-len 128 --samples 2 \
    --moments host -o "$work/calibrate-$range.safetensors"
done

python3 -m nblbench.scale report "$work" "$d" "$layers" "$k" "$copy_s"
