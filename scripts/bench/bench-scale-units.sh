#!/usr/bin/env bash
# What measuring units besides attention costs at the scale of an 8B model (Llama-3-8B's shapes:
# d = 4096, MLP 14336; the 3-layer GenAI int4 export with random weights that bench-scale.sh uses):
# calibrate layers 0..2 (2 sequences of 128 tokens, moments on the host, 2 threads) with
# `--units attention` (2 attention sites) and with `--units all` (2 sites, 2 MLPs, 2 layers, run 0-1,
# fold 1-1: 8 units), wall time and peak RSS of each; the per-unit memory extrapolated to 32 layers
# (32 units against 304). Adds `units` to bench/scale.json and a table to docs/results/scale.md
# (python3 -m nblbench.scale units).
#
#   scripts/bench/bench-scale-units.sh     # about 5 minutes on 2 cores once the export exists
#
# Installs what is missing: nbl-onnx (cargo build), ONNX Runtime (scripts/setup-ort.sh), GNU time, and
# the GenAI builder's virtualenv when the short export must be made (see bench-scale.sh).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
cd "$NBL_REPO"
need_gnu_time
use_nblbench
ensure_ort
nbl=$(nbl_binary)
work=bench/tmp/scale
mkdir -p "$work"
export RAYON_NUM_THREADS=2

slice=bench/tmp/int4/llama3-8b-slice
[[ -f $slice/model.onnx ]] || slice=$work/slice
if [[ ! -f $slice/model.onnx ]]; then
  echo "==> a 3-layer GenAI int4 export of Llama-3-8B's shape (random weights)"
  builder_python=$(genai_python)
  run_nice "$builder_python" scripts/models/make_synthetic.py --shape llama-3-8b --layers 3 --precision int4 \
    --provider cpu --out "$slice" > "$work/slice-build.log" 2>&1 \
    || die "scripts/models/make_synthetic.py failed: see $work/slice-build.log"
fi

for units in attention all; do
  echo "==> calibrate layers 0..2 of the short export, --units $units, 2 threads"
  rm -f "$work/units-$units.safetensors"
  /usr/bin/time -f "%e %M" -o "$work/units-$units.time" "$nbl" calibrate "$slice/model.onnx" \
    --layer-range 0..2 --seq-len 128 --samples 2 --moments host --units "$units" \
    -o "$work/units-$units.safetensors" 2> "$work/units-$units.log"
done

python3 -m nblbench.scale units "$work"
