#!/usr/bin/env bash
# Statistics and rewriting at the scale of an 8B model (Llama-3-8B's shapes: d = 4096, 32 layers,
# 32 query / 8 KV heads of 128, MLP 14336, GenAI int4 export with random weights):
#   1. the model: a 3-layer GenAI export (scripts/make_synthetic.py; reused from bench-int4.sh's
#      4-layer slice when that exists) grown to 32 layers by scripts/repeat_layers.py, which repeats a
#      middle layer and points its weights at the same bytes (the data file is hard-linked);
#   2. a full-size statistics file for it, written without calibrating (scripts/make_scale_stats.py:
#      the model's fingerprint and layers, synthetic moments);
#   3. `analyze` of all 32 layers on 2 threads: wall time and peak RSS (layers are read from the file
#      and fitted one at a time, each fit parallel within);
#   4. the bound + LMMSE fit of one d = 4096 layer on 2 threads (`analyze` of a one-layer file);
#   5. `rewrite --layers 12` of the 32-layer model with its statistics (12 maps fitted again and
#      quantised by GPTQ to the model's int4, the 6.6 GB data file copied): wall time, peak RSS, and
#      the output's MB/s against `cp` of the same output file, measured right after;
#   6. the file's size against the 3d² f64 per layer of format version 1;
#   7. calibration's peak RSS for 1 and 2 layers of the short export (--layer-range 0..1, 0..2; 2 blocks
#      of 128 tokens, moments on the host), the difference being one layer's, extrapolated to 32.
# Writes bench/scale.json.
#
#   scripts/bench-scale.sh        # about 15 minutes on 2 cores; 19 GB of disk under bench/tmp
#
# Needs the GenAI builder's virtualenv when no slice exists (NBL_GENAI_VENV, see bench-int4.sh),
# Python with numpy and onnx (NBL_EXPORT_VENV's) and GNU time.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/nbl-onnx/target}"
python="${NBL_EXPORT_VENV:-$HOME/.cache/nbl-onnx/py/export}/bin/python"
[[ -x $python ]] || python=python3
"$python" -c "import numpy, onnx" || { echo "error: $python has no numpy or onnx" >&2; exit 2; }
cargo build --release --locked --quiet
nbl="$CARGO_TARGET_DIR/release/nbl-onnx"
work=bench/tmp/scale
mkdir -p "$work"
d=4096 layers=32 k=12
export RAYON_NUM_THREADS=2

slice=bench/tmp/int4/llama3-8b-slice
if [[ ! -f $slice/model.onnx ]]; then
  slice=$work/slice
  if [[ ! -f $slice/model.onnx ]]; then
    echo "==> a 3-layer GenAI int4 export of Llama-3-8B's shape (random weights)"
    genai_python="${NBL_GENAI_VENV:-$HOME/.cache/nbl-onnx/py/genai}/bin/python"
    "$genai_python" scripts/make_synthetic.py --shape llama-3-8b --layers 3 --precision int4 --provider cpu \
      --out "$slice" > "$work/slice-build.log" 2>&1
  fi
fi
echo "==> grown to $layers layers"
rm -rf "$work/model" "$work/rewritten"
"$python" scripts/repeat_layers.py "$slice" "$work/model" --layers "$layers"
"$nbl" inspect "$work/model/model.onnx" --json > "$work/inspect.json"

echo "==> writing a $layers-layer statistics file at d = $d for it"
rm -f "$work/stats.safetensors"
"$python" scripts/make_scale_stats.py "$work/stats.safetensors" --inspect "$work/inspect.json"
"$python" scripts/make_scale_stats.py "$work/one.safetensors" --hidden "$d" --layers 1

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
copy_s=$("$python" -c 'import shutil, sys, time
t = time.time(); shutil.copyfile(sys.argv[1], sys.argv[2]); print(time.time() - t)' \
  "$work/rewritten/model.onnx.data" "$work/copy.data")
rm -f "$work/copy.data"

for range in 0..1 0..2; do
  echo "==> calibrate layers $range of the short export, 2 threads"
  measure "calibrate-$range" calibrate "$slice/model.onnx" --layer-range "$range" --seq-len 128 --samples 2 \
    --moments host -o "$work/calibrate-$range.safetensors"
done

"$python" - "$work" "$d" "$layers" "$k" "$copy_s" <<'PY'
import json, os, sys
work, d, layers, k, copy_s = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
def timed(name):
    wall, rss_kb = open(f"{work}/{name}.time").read().split()
    return float(wall), int(rss_kb) / 1024
analyze_s, analyze_mb = timed("analyze")
one_s, one_mb = timed("one")
rewrite_s, rewrite_mb = timed("rewrite")
_, one_layer_mb = timed("calibrate-0..1")
_, two_layers_mb = timed("calibrate-0..2")
per_layer_mb = two_layers_mb - one_layer_mb
out = f"{work}/rewritten"
out_bytes = sum(os.path.getsize(f"{out}/{f}") for f in os.listdir(out) if f.startswith("model.onnx"))
report = json.load(open(f"{work}/rewrite.report.json"))
result = {
    "hidden_size": d,
    "layers": layers,
    "threads": 2,
    "stats_bytes": os.path.getsize(f"{work}/stats.safetensors"),
    "stats_bytes_format_1": layers * (3 * d * d + 2 * d + 2) * 8,
    "analyze_s": analyze_s,
    "analyze_peak_rss_mb": round(analyze_mb, 1),
    "solve_s_per_layer": one_s,
    "one_layer_peak_rss_mb": round(one_mb, 1),
    "rewrite_layers": k,
    "rewrite_weight_format": report["rewrite"]["weight_format"],
    "rewrite_s": rewrite_s,
    "rewrite_peak_rss_mb": round(rewrite_mb, 1),
    "rewrite_output_bytes": out_bytes,
    "rewrite_output_mb_per_s": round(out_bytes / 1e6 / rewrite_s, 1),
    "disk_copy_s": round(copy_s, 2),
    "disk_copy_mb_per_s": round(out_bytes / 1e6 / copy_s, 1),
    "calibrate_1_layer_peak_rss_mb": round(one_layer_mb, 1),
    "calibrate_2_layers_peak_rss_mb": round(two_layers_mb, 1),
    "calibrate_per_layer_mb": round(per_layer_mb, 1),
    "calibrate_per_layer_mb_expected": round(3 * d * d * 8 / 2**20, 1),
    "calibrate_32_layers_peak_rss_mb_extrapolated": round(one_layer_mb + (layers - 1) * per_layer_mb, 1),
    "note": "rewrite = analyze of all layers + the chosen layers' fits and GPTQ + copying the weights; "
            "the model repeats one layer's weights (scripts/repeat_layers.py), the statistics are synthetic; "
            "calibration memory is measured on the short export (the model's weights are in its base)",
}
json.dump(result, open("bench/scale.json", "w"), indent=2)
print(json.dumps(result, indent=2))
PY
