#!/usr/bin/env bash
# Statistics at the scale of an 8B model: a file of Llama-3-8B's shape (d = 4096, 32 layers) written
# without calibrating (scripts/make_scale_stats.py), then:
#   - `analyze` of all 32 layers on 2 threads: peak RSS and wall time (layers are read from the file
#     one at a time, so the peak follows the threads, not the layers);
#   - the bound + LMMSE fit of one d = 4096 layer on 2 threads (`analyze` of a one-layer file);
#   - the file's size against the 3d² f64 per layer of format version 1.
# Writes bench/scale.json.
#
#   scripts/bench-scale.sh            # about 10 minutes on 2 cores; 8.6 GB of disk under bench/tmp
#
# Needs Python with numpy (NBL_EXPORT_VENV's, or python3 if it has numpy) and GNU time.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/nbl-onnx/target}"
python="${NBL_EXPORT_VENV:-$HOME/.cache/nbl-onnx/py/export}/bin/python"
[[ -x $python ]] || python=python3
"$python" -c "import numpy" || { echo "error: $python has no numpy" >&2; exit 2; }
cargo build --release --locked --quiet
nbl="$CARGO_TARGET_DIR/release/nbl-onnx"
work=bench/tmp/scale
mkdir -p "$work"
d=4096 layers=32
export RAYON_NUM_THREADS=2

echo "==> writing a $layers-layer statistics file at d = $d"
"$python" scripts/make_scale_stats.py "$work/stats.safetensors" --hidden "$d" --layers "$layers"
"$python" scripts/make_scale_stats.py "$work/one.safetensors" --hidden "$d" --layers 1

measure() { # measure NAME ARGS...: wall seconds and peak RSS (MiB) of nbl-onnx ARGS
  local name=$1
  shift
  /usr/bin/time -f "%e %M" -o "$work/$name.time" "$nbl" "$@" > "$work/$name.out"
}
echo "==> analyze, $layers layers, 2 threads"
measure analyze analyze "$work/stats.safetensors" --json --chart "$work/stats.svg"
echo "==> analyze, 1 layer, 2 threads"
measure one analyze "$work/one.safetensors" --json --chart "$work/one.svg"

"$python" - "$work" "$d" "$layers" <<'PY'
import json, os, sys
work, d, layers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def timed(name):
    wall, rss_kb = open(f"{work}/{name}.time").read().split()
    return float(wall), int(rss_kb) / 1024
analyze_s, analyze_mb = timed("analyze")
one_s, one_mb = timed("one")
result = {
    "hidden_size": d,
    "layers": layers,
    "stats_bytes": os.path.getsize(f"{work}/stats.safetensors"),
    "stats_bytes_format_1": layers * (3 * d * d + 2 * d + 2) * 8,
    "analyze_s": analyze_s,
    "analyze_peak_rss_mb": analyze_mb,
    "solve_s_per_layer": one_s,
    "one_layer_peak_rss_mb": one_mb,
    "threads": 2,
    "rewrite_peak_rss_mb": None,
    "note": "rewrite needs a model with this fingerprint; not measured here",
}
json.dump(result, open("bench/scale.json", "w"), indent=2)
print(json.dumps(result, indent=2))
PY
