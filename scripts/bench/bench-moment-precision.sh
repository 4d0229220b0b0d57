#!/usr/bin/env bash
# f32 per-batch moments against f64 on SmolLM2-135M-Instruct (the Optimum export), on the CPU:
# calibrate C4 documents 0-199 four ways (moments on the host and in the graph, each batch's products
# in f64 and in f32), compare the CCA bounds and rankings, rewrite k = 8 from each precision's
# statistics and evaluate both on documents 200-299, and time plain inference on the calibration text
# in the same run. Writes bench/moment-precision.json and the table of docs/results/moment-precision.md
# (python3 -m nblbench.precision).
#
#   scripts/bench/bench-moment-precision.sh       # about 12 minutes on 2 cores; run nothing else meanwhile
#
# Needs models/smollm2-optimum (scripts/models/prepare-smollm2.sh); builds nbl-onnx and installs ONNX
# Runtime (scripts/setup-ort.sh) where missing.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
cd "$NBL_REPO"
seq_len=512 samples=64 k=8
model=models/smollm2-optimum/model.onnx
need_model "$(dirname "$model")"
use_nblbench
ensure_ort
nbl=$(nbl_binary)
work=bench/tmp/moment-precision
rm -rf "$work"
mkdir -p "$work"
python3 -m nblbench.corpus "$work" > /dev/null

for moments in host graph; do
  for precision in f64 f32; do
    name=$moments-$precision
    echo "==> calibrating: moments $moments, products in $precision"
    "$nbl" calibrate "$model" --data "$work/calibration.json" --seq-len "$seq_len" --samples "$samples" \
      --moments "$moments" --moment-precision "$precision" -o "$work/$name.safetensors" 2> "$work/$name.log"
    "$nbl" analyze "$work/$name.safetensors" --json > "$work/$name-analysis.json"
  done
done
echo "==> plain inference of the original on the calibration text (calibration's share of it)"
"$nbl" eval "$model" --data "$work/calibration.json" --seq-len "$seq_len" --samples "$samples" --engine ort \
  --json > "$work/inference.json"
for precision in f64 f32; do
  echo "==> rewrite k=$k from the $precision statistics"
  "$nbl" rewrite "$model" --stats "$work/host-$precision.safetensors" --layers "$k" \
    -o "$work/k$k-$precision/model.onnx" --report "$work/k$k-$precision/report.json" 2> /dev/null
done
echo "==> held-out perplexity of both rewrites"
"$nbl" eval "$model" "$work/k$k-f64/model.onnx" "$work/k$k-f32/model.onnx" --data "$work/evaluation.json" \
  --seq-len "$seq_len" --engine ort --json > "$work/eval.json"
python3 -m nblbench.precision "$work"
